"""Hypothesis strategies for hostile gRPC messages: mutated PredictRequests, model specs,
GetModelStatus / GetModelMetadata junk, and raw bytes near valid messages."""

from __future__ import annotations

from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from tests.serving.conformance.conftest import MODEL
from tests.serving.conformance.requests import images

INT64_MAX = 2**63 - 1
# Protobuf strings are UTF-8: surrogates cannot be set, everything else may be.
unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
huge_text = st.integers(1_000, 20_000).map(lambda n: "\u00e9x" * (n // 2))
names = st.one_of(
    st.just(MODEL), st.just(MODEL), st.just(""), st.just("TINY"), unicode_text, huge_text
)
signature_names = st.one_of(
    st.sampled_from(["", "serving_default", "predict_image_bytes", "__saved_model_init_op"]),
    unicode_text,
    huge_text,
)
input_keys = st.one_of(st.sampled_from(["images", "image_bytes"]), unicode_text)
# Valid DataTypes, DT_INVALID, reference types (101+) and values no enum has.
dtypes = st.one_of(
    st.sampled_from(sorted(types_pb2.DataType.values())),
    st.integers(-5, 300),
    st.sampled_from([-(2**31), 2**31 - 1]),
)
dims = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 28, 2**31, 2**40, 2**62, INT64_MAX, -(2**63)]),
    st.integers(-3, 64),
)
shapes = st.lists(dims, max_size=6)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


def _shape_proto(sizes, unknown_rank: bool) -> tensor_shape_pb2.TensorShapeProto:
    proto = tensor_shape_pb2.TensorShapeProto(unknown_rank=unknown_rank)
    proto.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in sizes)
    return proto


# The values of a TensorProto: none, raw bytes of any length, or any typed field.
VALUE_FIELDS = {
    "tensor_content": st.binary(max_size=4096),
    "float_val": st.lists(floats, max_size=800),
    "double_val": st.lists(st.floats(), max_size=100),
    "int_val": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=100),
    "int64_val": st.lists(st.integers(-(2**63), INT64_MAX), max_size=100),
    "string_val": st.lists(st.binary(max_size=300), max_size=20),
    "bool_val": st.lists(st.booleans(), max_size=100),
    "half_val": st.lists(st.integers(0, 2**31 - 1), max_size=100),
}


@st.composite
def tensors(draw) -> tensor_pb2.TensorProto:
    """A TensorProto with any dtype, shape and values (often inconsistent with each other)."""
    proto = tensor_pb2.TensorProto(dtype=draw(dtypes))
    proto.tensor_shape.CopyFrom(_shape_proto(draw(shapes), draw(st.booleans())))
    for name in draw(st.lists(st.sampled_from(sorted(VALUE_FIELDS)), max_size=2, unique=True)):
        value = draw(VALUE_FIELDS[name])
        if name == "tensor_content":
            proto.tensor_content = value
        else:
            getattr(proto, name).extend(value)
    return proto


@st.composite
def image_tensors(draw) -> tensor_pb2.TensorProto:
    """Nearly right: DT_FLOAT images, a batch of 0-4, sometimes a byte short or long."""
    count = draw(st.integers(0, 4))
    array = images(max(count, 1))[:count]
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=array.tobytes())
    proto.tensor_shape.CopyFrom(_shape_proto(array.shape, False))
    cut = draw(st.sampled_from([0, 0, 0, -1, 1, -4]))
    if cut < 0:
        proto.tensor_content = proto.tensor_content[:cut]
    elif cut > 0:
        proto.tensor_content += b"\x00" * cut
    return proto


@st.composite
def model_specs(draw, message) -> None:
    """Fill (or leave out) `message.model_spec` with any name, version or label."""
    if draw(st.integers(0, 9)) == 0:
        return  # no model_spec at all
    spec = message.model_spec
    spec.name = draw(names)
    choice = draw(st.sampled_from(["none", "none", "version", "label"]))
    if choice == "version":
        spec.version.value = draw(
            st.one_of(st.just(1), st.integers(-(2**63), INT64_MAX), st.integers(-2, 3))
        )
    elif choice == "label":
        spec.version_label = draw(st.one_of(st.just("stable"), unicode_text, huge_text))


@st.composite
def predict_requests(draw) -> predict_pb2.PredictRequest:
    """A PredictRequest mutated anywhere: spec, signature, inputs, values, output_filter."""
    request = predict_pb2.PredictRequest()
    draw(model_specs(request))
    if request.HasField("model_spec"):
        request.model_spec.signature_name = draw(signature_names)
    keys = draw(st.lists(input_keys, max_size=3, unique=True))
    for key in keys:
        request.inputs[key].CopyFrom(draw(st.one_of(image_tensors(), tensors())))
    request.output_filter.extend(
        draw(
            st.lists(
                st.one_of(st.sampled_from(["classes", "probabilities"]), unicode_text), max_size=3
            )
        )
    )
    return request


@st.composite
def status_requests(draw) -> get_model_status_pb2.GetModelStatusRequest:
    request = get_model_status_pb2.GetModelStatusRequest()
    draw(model_specs(request))
    return request


@st.composite
def metadata_requests(draw) -> get_model_metadata_pb2.GetModelMetadataRequest:
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    draw(model_specs(request))
    fields = st.one_of(st.just("signature_def"), unicode_text, huge_text)
    request.metadata_field.extend(draw(st.lists(fields, max_size=3)))
    return request


@st.composite
def mutated_bytes(draw, valid: bytes) -> bytes:
    """`valid` with bytes flipped, cut, inserted or repeated: mostly near-misses of a real
    message, which get further into a parser than random noise does."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, max(len(data) - 1, 0)))
        edit = draw(st.sampled_from(["flip", "cut", "insert", "truncate", "repeat"]))
        if edit == "flip" and data:
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif edit == "cut":
            del data[where : where + draw(st.integers(1, 8))]
        elif edit == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "truncate":
            del data[where:]
        else:
            data += data[where : where + 64]
    return bytes(data)


def raw_bytes(valid: bytes):
    """Random bytes, or near-misses of `valid`."""
    return st.one_of(st.binary(max_size=256), mutated_bytes(valid))
