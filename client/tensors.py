"""numpy <-> TensorProto conversion without the TensorFlow runtime (numpy and the protos only).

This is on the hot path of every call, so the numeric encoding is one `tobytes()` into
`tensor_content` (raw little-endian bytes, C order) and the decoding one `np.frombuffer` over it.
Decoding also accepts every typed `*_val` field TensorFlow and TensorFlow Serving write (TF
Serving answers with typed fields by default), with TensorFlow's rules: fewer values than the
shape needs repeat the last value (one value fills the whole shape), no values at all mean zeros.
Arrays decoded from tensor_content are read-only views of the proto's bytes (no copy) unless
`to_ndarray(..., writable=True)` is asked for.

Strings: pass bytes/str, lists of them or object arrays. numpy's fixed-width `S` arrays have
already lost trailing NUL bytes before they get here; lists are converted to object arrays so
that they keep theirs.

Every function takes TensorFlow's own TensorProto as well as the client's (convstack.client.wire,
the same bytes on the wire): decoding reads fields by name, and encoding builds `proto_type`
(the server passes TensorFlow's class, its responses are TF Serving's messages).

Big-endian hosts are not supported: `tensor_content` is little-endian on the wire and this module
never byte-swaps on decode, so importing it there raises ImportError.

bfloat16 needs `ml_dtypes` (installed with TensorFlow); without it DT_BFLOAT16 is unsupported.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from convstack.client._protos import tensor_pb2, types_pb2

try:  # an optional dependency of the client, always present next to TensorFlow
    import ml_dtypes
except ImportError:  # pragma: no cover - exercised only where TensorFlow is absent
    ml_dtypes = None

if sys.byteorder != "little":  # pragma: no cover - no big-endian machine in CI
    raise ImportError("client.tensors supports little-endian hosts only")

__all__ = [
    "DTYPE_TO_ENUM",
    "ENUM_TO_DTYPE",
    "dtype_name",
    "to_ndarray",
    "to_tensor_proto",
    "to_typed_tensor_proto",
]

TensorProto = tensor_pb2.TensorProto

_STRING_DTYPE = np.dtype(object)

# numpy dtype -> DataType enum for everything that travels as raw bytes in tensor_content.
DTYPE_TO_ENUM: dict[np.dtype, int] = {
    np.dtype(np.float32): types_pb2.DT_FLOAT,
    np.dtype(np.float64): types_pb2.DT_DOUBLE,
    np.dtype(np.float16): types_pb2.DT_HALF,
    np.dtype(np.int8): types_pb2.DT_INT8,
    np.dtype(np.int16): types_pb2.DT_INT16,
    np.dtype(np.int32): types_pb2.DT_INT32,
    np.dtype(np.int64): types_pb2.DT_INT64,
    np.dtype(np.uint8): types_pb2.DT_UINT8,
    np.dtype(np.uint16): types_pb2.DT_UINT16,
    np.dtype(np.uint32): types_pb2.DT_UINT32,
    np.dtype(np.uint64): types_pb2.DT_UINT64,
    np.dtype(np.bool_): types_pb2.DT_BOOL,
    np.dtype(np.complex64): types_pb2.DT_COMPLEX64,
    np.dtype(np.complex128): types_pb2.DT_COMPLEX128,
}
if ml_dtypes is not None:
    DTYPE_TO_ENUM[np.dtype(ml_dtypes.bfloat16)] = types_pb2.DT_BFLOAT16

# DataType enum -> numpy dtype; DT_STRING decodes to an object array of bytes, as in TensorFlow.
ENUM_TO_DTYPE: dict[int, np.dtype] = {enum: dtype for dtype, enum in DTYPE_TO_ENUM.items()}
ENUM_TO_DTYPE[types_pb2.DT_STRING] = _STRING_DTYPE

# Which typed repeated field holds the values of each dtype when tensor_content is empty
# (TensorFlow's Tensor::AsProtoField: small ints share int_val; half and bfloat16 keep their
# 16-bit patterns in half_val; complex numbers are (real, imag) pairs).
_VALUE_FIELD = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_HALF: "half_val",
    types_pb2.DT_BFLOAT16: "half_val",
    types_pb2.DT_COMPLEX64: "scomplex_val",
    types_pb2.DT_COMPLEX128: "dcomplex_val",
}
_BIT_PATTERN_ENUMS = frozenset({types_pb2.DT_HALF, types_pb2.DT_BFLOAT16})
_COMPLEX_PARTS = {
    types_pb2.DT_COMPLEX64: np.dtype(np.float32),
    types_pb2.DT_COMPLEX128: np.dtype(np.float64),
}

# Shapes repeat from call to call (same batch size, same image size), and building a
# TensorShapeProto or reading its dims back costs as much as copying a small batch, so both
# directions keep a small cache. Cleared wholesale when full: bounded memory, no LRU bookkeeping.
# Keyed by the shape's message class too: CopyFrom needs the class of the proto being filled.
_CACHE_LIMIT = 512
_SHAPE_PROTOS: dict[tuple[type, tuple[int, ...]], object] = {}
_SHAPE_TUPLES: dict[bytes, tuple[int, ...]] = {}


def dtype_name(enum: int) -> str:
    """The DataType name of an enum value, e.g. 1 -> "DT_FLOAT" (ValueError if unknown)."""
    return types_pb2.DataType.Name(enum)


def _set_shape(proto, shape: tuple[int, ...]) -> None:
    target = proto.tensor_shape
    key = (type(target), shape)
    cached = _SHAPE_PROTOS.get(key)
    if cached is None:
        cached = type(target)()
        for size in shape:
            cached.dim.add(size=size)
        if len(_SHAPE_PROTOS) >= _CACHE_LIMIT:
            _SHAPE_PROTOS.clear()
        _SHAPE_PROTOS[key] = cached
    target.CopyFrom(cached)


def _to_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(
        f"DT_STRING tensors hold bytes or str, got an element of type {type(value).__name__}"
    )


def _as_array(value, dtype) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value if dtype is None else value.astype(dtype, copy=False)
    if isinstance(value, (bytes, str)):
        return np.array(value, dtype=_STRING_DTYPE)
    array = np.asarray(value, dtype=dtype)
    if array.dtype.kind in "US":
        # numpy's fixed-width strings drop trailing NUL bytes; object arrays keep them.
        array = np.array(value, dtype=_STRING_DTYPE)
    return array


def _string_proto(array: np.ndarray, proto_type: type) -> TensorProto:
    flat = array.ravel().tolist()
    kind = array.dtype.kind
    if kind == "U":
        values = [item.encode("utf-8") for item in flat]
    elif kind == "S":
        values = flat
    else:
        values = [item if type(item) is bytes else _to_bytes(item) for item in flat]
    proto = proto_type(dtype=types_pb2.DT_STRING)
    _set_shape(proto, array.shape)
    proto.string_val.extend(values)
    return proto


def to_tensor_proto(value, dtype=None, *, proto_type: type = TensorProto) -> TensorProto:
    """Encode a numpy array, numpy/Python scalar, (nested) list, bytes or str as a TensorProto.

    Numeric and bool arrays become `dtype` + `tensor_shape` + `tensor_content` (raw
    little-endian bytes in C order, whatever the input's memory order). bytes/str and arrays of
    them become DT_STRING `string_val` (str encoded as UTF-8). Python values follow numpy's type
    inference (int -> int64, float -> float64) unless `dtype` is given. TypeError names any dtype
    that has no TensorFlow DataType (e.g. datetime64, longdouble, structured dtypes).
    `proto_type` is the message class to build: the client's TensorProto or TensorFlow's.
    """
    array = _as_array(value, dtype)
    if array.dtype.kind in "USO":
        return _string_proto(array, proto_type)
    array, enum = _numeric(array)
    proto = proto_type(dtype=enum, tensor_content=array.tobytes())
    _set_shape(proto, array.shape)
    return proto


def to_typed_tensor_proto(value, dtype=None, *, proto_type: type = TensorProto) -> TensorProto:
    """Encode like `to_tensor_proto`, but with the values in the typed `*_val` field.

    This is TensorFlow's Tensor::AsProtoField, what TF Serving answers with by default and what
    clients written for it read (`float_val`, `int64_val`, `string_val`, ...): small integer
    types share `int_val`, half and bfloat16 keep their 16-bit patterns in `half_val`, complex
    numbers are (real, imag) pairs. `proto_type` as in `to_tensor_proto`.
    """
    array = _as_array(value, dtype)
    if array.dtype.kind in "USO":
        return _string_proto(array, proto_type)
    array, enum = _numeric(array)
    flat = array.ravel()
    if enum in _BIT_PATTERN_ENUMS:
        flat = flat.view(np.uint16)
    elif enum in _COMPLEX_PARTS:
        flat = flat.view(_COMPLEX_PARTS[enum])
    proto = proto_type(dtype=enum)
    _set_shape(proto, array.shape)
    getattr(proto, _VALUE_FIELD[enum]).extend(flat.tolist())
    return proto


def _numeric(array: np.ndarray) -> tuple[np.ndarray, int]:
    """(the array in native byte order, its DataType enum); TypeError if it has none."""
    enum = DTYPE_TO_ENUM.get(array.dtype)
    if enum is None and not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
        enum = DTYPE_TO_ENUM.get(array.dtype)
    if enum is None:
        raise TypeError(f"unsupported dtype {array.dtype}: it has no TensorFlow DataType")
    return array, enum


def _shape_of(shape_proto) -> tuple[int, ...]:
    key = shape_proto.SerializeToString()
    shape = _SHAPE_TUPLES.get(key)
    if shape is None:
        if shape_proto.unknown_rank:
            raise ValueError("a TensorProto cannot have a shape of unknown rank")
        shape = tuple(dim.size for dim in shape_proto.dim)
        if any(size < 0 for size in shape):
            raise ValueError(f"a TensorProto needs a fully defined shape, got {list(shape)}")
        if len(_SHAPE_TUPLES) >= _CACHE_LIMIT:
            _SHAPE_TUPLES.clear()
        _SHAPE_TUPLES[key] = shape
    return shape


def _fill(values: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """TensorFlow's rule for typed fields: zeros if empty, else repeat the last value."""
    count = math.prod(shape)
    if values.size == count:
        return values.reshape(shape)
    if values.size == 0:
        return np.zeros(shape, dtype)
    if values.size > count:
        raise ValueError(f"TensorProto holds {values.size} values, more than shape {list(shape)}")
    padding = np.full(count - values.size, values[-1], dtype=values.dtype)
    return np.concatenate([values, padding]).reshape(shape)


def _typed_values(proto: TensorProto, enum: int, dtype: np.dtype) -> np.ndarray:
    field = getattr(proto, _VALUE_FIELD[enum])
    if enum in _BIT_PATTERN_ENUMS:
        return np.array(field, dtype=np.uint16).view(dtype)
    part = _COMPLEX_PARTS.get(enum)
    if part is not None:
        parts = np.array(field, dtype=part)
        if parts.size % 2:
            raise ValueError(f"{dtype_name(enum)} values must come in (real, imag) pairs")
        return parts.view(dtype)
    # np.array reads the repeated field ~4x faster than np.fromiter does.
    return np.array(field, dtype=dtype)


def _read_varint(buffer: bytes, offset: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buffer[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, offset
        shift += 7


def _decode_string_content(content: bytes, count: int) -> list[bytes]:
    """TensorFlow's string-list encoding of tensor_content: all lengths as varints, then data."""
    lengths = []
    offset = 0
    try:
        for _ in range(count):
            length, offset = _read_varint(content, offset)
            lengths.append(length)
    except IndexError:
        raise ValueError("DT_STRING tensor_content is truncated") from None
    values = []
    for length in lengths:
        values.append(content[offset : offset + length])
        offset += length
    if offset != len(content):
        raise ValueError("DT_STRING tensor_content does not match its shape")
    return values


def _string_array(proto: TensorProto, shape: tuple[int, ...]) -> np.ndarray:
    count = math.prod(shape)
    if proto.tensor_content:
        values = _decode_string_content(proto.tensor_content, count)
    else:
        values = list(proto.string_val)
    if len(values) > count:
        raise ValueError(f"TensorProto holds {len(values)} strings, more than shape {list(shape)}")
    if len(values) < count:
        values.extend([values[-1] if values else b""] * (count - len(values)))
    array = np.empty(count, dtype=_STRING_DTYPE)
    array[:] = values
    return array.reshape(shape)


def to_ndarray(proto: TensorProto, *, writable: bool = False) -> np.ndarray:
    """Decode a TensorProto, the client's or TensorFlow's (tensor_content or any typed `*_val`
    field), into a numpy array.

    From `tensor_content` the result is a zero-copy, read-only view of the proto's bytes unless
    `writable=True` (one extra copy, what `tf.make_ndarray` always does). Arrays built from typed
    fields are always fresh and writable. DT_STRING gives an object array of bytes. TypeError
    for dtypes without a numpy counterpart here (resource, variant, quantized, float8, ...).
    """
    enum = proto.dtype
    dtype = ENUM_TO_DTYPE.get(enum)
    if dtype is None:
        name = types_pb2.DataType.Name(enum) if enum in types_pb2.DataType.values() else enum
        raise TypeError(f"unsupported tensor dtype {name}")
    shape = _shape_of(proto.tensor_shape)
    if enum == types_pb2.DT_STRING:
        return _string_array(proto, shape)
    content = proto.tensor_content
    if content:
        try:
            array = np.frombuffer(content, dtype=dtype).reshape(shape)
        except ValueError as exc:
            raise ValueError(
                f"tensor_content of {len(content)} bytes does not hold a {dtype} "
                f"array of shape {list(shape)}: {exc}"
            ) from None
        return array.copy() if writable else array
    return _fill(_typed_values(proto, enum, dtype), shape, dtype)
