"""client.tensors against TensorFlow's own make_tensor_proto / make_ndarray, both directions."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from convstack.client import _protos
from convstack.client.tensors import (
    DTYPE_TO_ENUM,
    ENUM_TO_DTYPE,
    dtype_name,
    to_ndarray,
    to_tensor_proto,
    to_typed_tensor_proto,
)

TensorProto = _protos.tensor_pb2.TensorProto
types_pb2 = _protos.types_pb2

NUMERIC_DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    ml_dtypes.bfloat16,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
    np.complex64,
    np.complex128,
]
DTYPE_IDS = [np.dtype(dtype).name for dtype in NUMERIC_DTYPES]
SHAPES = [(), (0,), (3, 0), (1,), (7,), (2, 3, 4, 1)]


def _values(dtype, shape, seed=0) -> np.ndarray:
    """Values that exercise each dtype's range (negatives, fractions, large magnitudes)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    if dtype.kind == "c":
        return (rng.normal(size=shape) * 1e3 + 1j * rng.normal(size=shape)).astype(dtype)
    return (rng.normal(size=shape) * 100).astype(dtype)


def _assert_same(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    # Compare bit patterns so NaNs, -0.0 and bfloat16 compare exactly.
    assert got.tobytes() == np.ascontiguousarray(expected).tobytes()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=DTYPE_IDS)
def test_our_encoding_decodes_with_tensorflow(dtype, shape):
    array = _values(dtype, shape)
    proto = to_tensor_proto(array)
    assert proto.dtype == tf.as_dtype(array.dtype).as_datatype_enum
    assert [dim.size for dim in proto.tensor_shape.dim] == list(shape)
    _assert_same(tf.make_ndarray(proto), array)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=DTYPE_IDS)
def test_tensorflow_encoding_decodes_with_ours(dtype, shape):
    array = _values(dtype, shape, seed=1)
    # TF writes typed *_val fields for scalars and for uint16/bool/complex, tensor_content else.
    _assert_same(to_ndarray(tf.make_tensor_proto(array)), array)


# The typed field TensorFlow's Tensor::AsProtoField fills for each dtype (tensor.cc ProtoHelper).
AS_PROTO_FIELD = {
    "float32": "float_val",
    "float64": "double_val",
    "float16": "half_val",
    "bfloat16": "half_val",
    "int8": "int_val",
    "int16": "int_val",
    "int32": "int_val",
    "uint8": "int_val",
    "uint16": "int_val",
    "int64": "int64_val",
    "uint32": "uint32_val",
    "uint64": "uint64_val",
    "bool": "bool_val",
    "complex64": "scomplex_val",
    "complex128": "dcomplex_val",
}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=DTYPE_IDS)
def test_typed_encoding_fills_the_field_tensorflow_serving_answers_with(dtype, shape):
    """TF Serving answers with AsProtoField (predict_util.cc); its clients read `float_val`."""
    array = _values(dtype, shape, seed=4)
    proto = to_typed_tensor_proto(array)

    assert not proto.tensor_content
    field = AS_PROTO_FIELD[np.dtype(dtype).name]
    per_value = 2 if field.endswith("complex_val") else 1
    assert len(getattr(proto, field)) == array.size * per_value
    _assert_same(tf.make_ndarray(proto), array)
    _assert_same(to_ndarray(proto), array)


def test_typed_float_val_reads_as_tf_serving_clients_read_it():
    """mnist_client.py takes numpy.argmax of `float_val`; resnet_client_grpc.py prints it."""
    scores = np.array([[0.1, 0.7, 0.2]], np.float32)
    proto = to_typed_tensor_proto(scores)

    assert int(np.argmax(proto.float_val)) == 1
    assert list(proto.float_val) == pytest.approx([0.1, 0.7, 0.2])


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=DTYPE_IDS)
def test_round_trip_through_ours(dtype):
    array = _values(dtype, (4, 5), seed=2)
    _assert_same(to_ndarray(to_tensor_proto(array)), array)


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=DTYPE_IDS)
def test_single_typed_value_fills_the_whole_shape(dtype):
    scalar = _values(dtype, (), seed=3)
    proto = tf.make_tensor_proto(scalar, shape=[2, 3])
    assert not proto.tensor_content  # TF broadcasts through a typed field, not raw bytes
    expected = tf.make_ndarray(proto)
    assert expected.shape == (2, 3)
    _assert_same(to_ndarray(proto), expected)


def test_float_broadcast_from_python_scalar():
    proto = tf.make_tensor_proto(1.5, shape=[2, 3])
    np.testing.assert_array_equal(to_ndarray(proto), np.full((2, 3), 1.5, np.float32))


def test_fewer_typed_values_repeat_the_last_one_like_tensorflow():
    proto = tf.make_tensor_proto([1, 2], shape=[4])
    assert list(proto.int_val) == [1, 2]
    _assert_same(to_ndarray(proto), tf.make_ndarray(proto))
    np.testing.assert_array_equal(to_ndarray(proto), [1, 2, 2, 2])


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=DTYPE_IDS)
def test_no_values_mean_zeros(dtype):
    enum = DTYPE_TO_ENUM[np.dtype(dtype)]
    proto = TensorProto(dtype=enum)
    proto.tensor_shape.dim.add(size=2)
    proto.tensor_shape.dim.add(size=2)
    _assert_same(to_ndarray(proto), tf.make_ndarray(proto))
    _assert_same(to_ndarray(proto), np.zeros((2, 2), dtype))


@pytest.mark.parametrize(
    ("field", "dtype", "values"),
    [
        ("float_val", np.float32, [1.5, -2.25, float("inf")]),
        ("double_val", np.float64, [1e300, -0.5, 3.0]),
        ("int_val", np.int8, [-128, 127, 5]),
        ("int_val", np.int16, [-32768, 32767, 9]),
        ("int_val", np.int32, [-(2**31), 2**31 - 1, 0]),
        ("int_val", np.uint8, [0, 255, 17]),
        ("int_val", np.uint16, [0, 65535, 300]),
        ("int64_val", np.int64, [-(2**63), 2**63 - 1, 1]),
        ("uint32_val", np.uint32, [0, 2**32 - 1, 7]),
        ("uint64_val", np.uint64, [0, 2**64 - 1, 7]),
        ("bool_val", np.bool_, [True, False, True]),
    ],
)
def test_every_typed_field_as_tensorflow_reads_it(field, dtype, values):
    proto = TensorProto(dtype=DTYPE_TO_ENUM[np.dtype(dtype)])
    proto.tensor_shape.dim.add(size=3)
    getattr(proto, field).extend(values)
    _assert_same(to_ndarray(proto), tf.make_ndarray(proto))
    np.testing.assert_array_equal(to_ndarray(proto), np.array(values, dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["half", "bfloat16"])
def test_half_val_holds_16_bit_patterns(dtype):
    expected = np.array([1.5, -2.0, np.inf], dtype=dtype)
    proto = TensorProto(dtype=DTYPE_TO_ENUM[np.dtype(dtype)])
    proto.tensor_shape.dim.add(size=3)
    proto.half_val.extend(expected.view(np.uint16).tolist())
    _assert_same(to_ndarray(proto), expected)
    _assert_same(to_ndarray(proto), tf.make_ndarray(proto))


@pytest.mark.parametrize(
    ("field", "dtype"), [("scomplex_val", np.complex64), ("dcomplex_val", np.complex128)]
)
def test_complex_values_are_real_imag_pairs(field, dtype):
    proto = TensorProto(dtype=DTYPE_TO_ENUM[np.dtype(dtype)])
    proto.tensor_shape.dim.add(size=2)
    getattr(proto, field).extend([1.0, 2.0, -3.0, 0.5])
    expected = np.array([1 + 2j, -3 + 0.5j], dtype=dtype)
    _assert_same(to_ndarray(proto), expected)
    _assert_same(to_ndarray(proto), tf.make_ndarray(proto))
    getattr(proto, field).append(9.0)
    with pytest.raises(ValueError, match="pairs"):
        to_ndarray(proto)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: np.asfortranarray(a),
        lambda a: a[:, ::2],
        lambda a: a.transpose(2, 0, 1),
        lambda a: a[::-1],
        lambda a: a.astype(a.dtype.newbyteorder(">")),
    ],
    ids=["fortran", "strided", "transposed", "reversed", "big-endian"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.complex128], ids=str)
def test_any_memory_layout_encodes_in_c_order(make, dtype):
    base = _values(dtype, (4, 6, 3), seed=4)
    array = make(base)
    expected = np.ascontiguousarray(array).astype(base.dtype)
    proto = to_tensor_proto(array)
    assert proto.dtype == DTYPE_TO_ENUM[base.dtype]
    _assert_same(tf.make_ndarray(proto), expected)
    _assert_same(to_ndarray(proto), expected)


def test_tensor_content_decodes_to_a_read_only_view_unless_writable():
    proto = to_tensor_proto(np.arange(6, dtype=np.float32).reshape(2, 3))
    view = to_ndarray(proto)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0, 0] = 1.0
    copy = to_ndarray(proto, writable=True)
    copy[0, 0] = 42.0
    assert to_ndarray(proto)[0, 0] == 0.0


def test_typed_field_results_are_writable():
    array = to_ndarray(tf.make_tensor_proto(np.float32(2.0), shape=[2]))
    array[0] = 5.0
    np.testing.assert_array_equal(array, [5.0, 2.0])


STRING_VALUES = [
    b"",
    b"plain",
    b"\x00leading and trailing nul\x00\x00",
    bytes(range(256)),
    b"\xff\xfe not utf-8",
]


def test_arbitrary_bytes_round_trip_both_ways():
    array = np.array(STRING_VALUES, dtype=object)
    proto = to_tensor_proto(array)
    assert proto.dtype == types_pb2.DT_STRING
    assert list(proto.string_val) == STRING_VALUES
    assert list(tf.make_ndarray(proto)) == STRING_VALUES
    assert list(to_ndarray(tf.make_tensor_proto(array))) == STRING_VALUES
    decoded = to_ndarray(proto)
    assert decoded.dtype == object
    assert list(decoded) == STRING_VALUES


def test_python_list_of_bytes_keeps_trailing_nul_bytes():
    proto = to_tensor_proto([[b"a\x00", b"b"], [b"c", b"\x00"]])
    assert [dim.size for dim in proto.tensor_shape.dim] == [2, 2]
    assert list(proto.string_val) == [b"a\x00", b"b", b"c", b"\x00"]


def test_unicode_strings_are_utf8():
    words = ["héllo", "日本語", "emoji 🙂", ""]
    expected = [word.encode("utf-8") for word in words]
    for value in (words, np.array(words), np.array(words, dtype=object)):
        proto = to_tensor_proto(value)
        assert list(proto.string_val) == expected
        assert list(tf.make_ndarray(proto)) == expected
        assert list(to_ndarray(proto)) == expected


def test_scalar_bytes_and_str():
    for value, expected in [(b"\x00\x01", b"\x00\x01"), ("ünï", "ünï".encode())]:
        proto = to_tensor_proto(value)
        assert proto.dtype == types_pb2.DT_STRING
        assert len(proto.tensor_shape.dim) == 0
        decoded = to_ndarray(proto)
        assert decoded.shape == ()
        assert decoded.item() == expected
        assert tf.make_ndarray(proto).item() == expected


def test_string_broadcast_and_multi_dim_from_tensorflow():
    proto = tf.make_tensor_proto(b"x", shape=[2, 2])
    assert list(proto.string_val) == [b"x"]
    np.testing.assert_array_equal(to_ndarray(proto), np.full((2, 2), b"x", dtype=object))
    words = np.array([[b"a", b"b", b"c"], [b"d", b"e", b"f"]], dtype=object)
    np.testing.assert_array_equal(to_ndarray(tf.make_tensor_proto(words)), words)


def test_empty_string_list_means_empty_strings():
    proto = TensorProto(dtype=types_pb2.DT_STRING)
    proto.tensor_shape.dim.add(size=3)
    assert list(to_ndarray(proto)) == [b"", b"", b""]


def _encode_string_list(values: list[bytes]) -> bytes:
    """TensorFlow's string tensor_content layout: varint lengths first, then the bytes."""
    lengths = bytearray()
    for value in values:
        length = len(value)
        while length >= 0x80:
            lengths.append((length & 0x7F) | 0x80)
            length >>= 7
        lengths.append(length)
    return bytes(lengths) + b"".join(values)


def test_string_tensor_content_as_tensorflow_decodes_it():
    values = [b"a", b"", b"\x00" * 300, "ü".encode()]
    proto = TensorProto(dtype=types_pb2.DT_STRING, tensor_content=_encode_string_list(values))
    proto.tensor_shape.dim.add(size=4)
    # TensorFlow's C++ Tensor::FromProto is the reference for this layout.
    reference = tf.io.parse_tensor(proto.SerializeToString(), tf.string).numpy()
    assert list(reference) == values
    assert list(to_ndarray(proto)) == values
    proto.tensor_content = proto.tensor_content[:-1]
    with pytest.raises(ValueError, match="tensor_content"):
        to_ndarray(proto)


def test_python_values_follow_numpy_inference_unless_dtype_given():
    assert to_tensor_proto(3).dtype == types_pb2.DT_INT64
    assert to_tensor_proto(2.5).dtype == types_pb2.DT_DOUBLE
    assert to_tensor_proto(True).dtype == types_pb2.DT_BOOL
    assert to_tensor_proto(1 + 2j).dtype == types_pb2.DT_COMPLEX128
    assert to_tensor_proto(np.float32(1.0)).dtype == types_pb2.DT_FLOAT
    proto = to_tensor_proto([[1, 2], [3, 4]], dtype=np.float32)
    assert proto.dtype == types_pb2.DT_FLOAT
    np.testing.assert_array_equal(tf.make_ndarray(proto), [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(to_ndarray(to_tensor_proto([1.5, 2.5])), [1.5, 2.5])


@pytest.mark.parametrize(
    "value",
    [
        np.array(["2024-01-01"], dtype="datetime64[D]"),
        np.array([1], dtype=np.longdouble),
        np.zeros(2, dtype=[("a", np.int32)]),
    ],
    ids=["datetime64", "longdouble", "structured"],
)
def test_unsupported_dtype_names_it(value):
    with pytest.raises(TypeError, match=re.escape(str(value.dtype))):
        to_tensor_proto(value)


def test_object_array_of_non_strings_is_rejected():
    with pytest.raises(TypeError, match="int"):
        to_tensor_proto(np.array([b"a", 3], dtype=object))


@pytest.mark.parametrize(
    "enum", [types_pb2.DT_RESOURCE, types_pb2.DT_VARIANT, types_pb2.DT_QINT8, 999]
)
def test_decoding_an_unsupported_dtype_names_it(enum):
    proto = TensorProto(dtype=enum)
    name = dtype_name(enum) if enum != 999 else "999"
    with pytest.raises(TypeError, match=name):
        to_ndarray(proto)


def test_inconsistent_protos_are_errors():
    too_many = tf.make_tensor_proto(np.arange(4, dtype=np.int32))
    too_many.tensor_shape.dim[0].size = 3
    with pytest.raises(ValueError, match="tensor_content of 16 bytes"):
        to_ndarray(too_many)
    typed = TensorProto(dtype=types_pb2.DT_FLOAT)
    typed.tensor_shape.dim.add(size=1)
    typed.float_val.extend([1.0, 2.0])
    with pytest.raises(ValueError, match="more than shape"):
        to_ndarray(typed)
    partial = TensorProto(dtype=types_pb2.DT_FLOAT)
    partial.tensor_shape.dim.add(size=-1)
    with pytest.raises(ValueError, match="fully defined"):
        to_ndarray(partial)


def test_dtype_maps_agree_with_tensorflow():
    for dtype, enum in DTYPE_TO_ENUM.items():
        assert tf.as_dtype(dtype).as_datatype_enum == enum
        assert ENUM_TO_DTYPE[enum] == dtype
    assert ENUM_TO_DTYPE[types_pb2.DT_STRING] == np.dtype(object)
    assert {np.dtype(dtype) for dtype in NUMERIC_DTYPES} == set(DTYPE_TO_ENUM)
    assert dtype_name(types_pb2.DT_FLOAT) == "DT_FLOAT"
    assert dtype_name(types_pb2.DT_STRING) == "DT_STRING"
    with pytest.raises(ValueError):
        dtype_name(999)


def test_protos_seam_takes_the_clients_own_messages():
    for name in _protos.__all__:
        assert getattr(_protos, name).__name__.startswith("convstack.client.wire.")
    assert _protos.predict_pb2.PredictRequest.DESCRIPTOR.full_name.startswith("convstack.wire.")
