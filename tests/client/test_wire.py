"""The client's own message definitions (client/wire) against TF Serving's: the same bytes
both ways for random messages and for what the embedded server answers, both import orders in
one process, the shared tensor codec over both TensorProto classes, and generated code that
`make protos` would not change."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory, unknown_fields
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2 as tf_tensor_pb2
from tensorflow.core.protobuf import meta_graph_pb2 as tf_meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2 as tf_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2 as tf_status_pb2
from tensorflow_serving.apis import model_management_pb2 as tf_management_pb2
from tensorflow_serving.apis import predict_pb2 as tf_predict_pb2

from convstack.client.loadgen import LoadSpec, predict_request_bytes
from convstack.client.tensors import to_ndarray, to_tensor_proto, to_typed_tensor_proto
from convstack.client.wire import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    meta_graph_pb2,
    model_management_pb2,
    predict_pb2,
    tensor_pb2,
)
from tests.client.conftest import MODEL, images

REPO_ROOT = Path(__file__).resolve().parents[2]
WIRE = REPO_ROOT / "client" / "wire"

# (ours, TF Serving's) for every message the client sends or reads.
PAIRS = [
    (tensor_pb2.TensorProto, tf_tensor_pb2.TensorProto),
    (meta_graph_pb2.SignatureDef, tf_meta_graph_pb2.SignatureDef),
    (predict_pb2.PredictRequest, tf_predict_pb2.PredictRequest),
    (predict_pb2.PredictResponse, tf_predict_pb2.PredictResponse),
    (get_model_metadata_pb2.GetModelMetadataRequest, tf_metadata_pb2.GetModelMetadataRequest),
    (get_model_metadata_pb2.GetModelMetadataResponse, tf_metadata_pb2.GetModelMetadataResponse),
    (get_model_metadata_pb2.SignatureDefMap, tf_metadata_pb2.SignatureDefMap),
    (get_model_status_pb2.GetModelStatusRequest, tf_status_pb2.GetModelStatusRequest),
    (get_model_status_pb2.GetModelStatusResponse, tf_status_pb2.GetModelStatusResponse),
    (model_management_pb2.ReloadConfigRequest, tf_management_pb2.ReloadConfigRequest),
    (model_management_pb2.ReloadConfigResponse, tf_management_pb2.ReloadConfigResponse),
]
IDS = [ours.DESCRIPTOR.name for ours, _ in PAIRS]

# --- random messages from a descriptor ------------------------------------------------------

_INT = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
MAX_DEPTH = 6  # GetModelMetadataResponse > Any; SignatureDefMap > SignatureDef > TensorInfo > ...


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    kind = field.type
    if kind in _INT:
        low, high = _INT[kind]
        return st.integers(low, high)
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=False)  # NaN != NaN would fail equality
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=False)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=6)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=6)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([value.number for value in field.enum_type.values])
    raise AssertionError(f"no strategy for field type {kind} ({field.full_name})")


def _is_message(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE


def _is_map(field: FieldDescriptor) -> bool:
    return _is_message(field) and field.message_type.GetOptions().map_entry


def _fill_field(draw, message, field: FieldDescriptor, depth: int) -> None:
    name = field.name
    if _is_map(field):
        key_field, value_field = field.message_type.fields_by_name["key"], None
        value_field = field.message_type.fields_by_name["value"]
        for key in draw(st.lists(_scalar(key_field), max_size=2, unique=True)):
            if _is_message(value_field):
                getattr(message, name)[key].CopyFrom(draw(messages(value_field, depth + 1)))
            else:
                getattr(message, name)[key] = draw(_scalar(value_field))
    elif field.is_repeated and _is_message(field):
        for item in draw(st.lists(messages(field, depth + 1), max_size=2)):
            getattr(message, name).add().CopyFrom(item)
    elif field.is_repeated:
        getattr(message, name).extend(draw(st.lists(_scalar(field), max_size=3)))
    elif _is_message(field):
        getattr(message, name).CopyFrom(draw(messages(field, depth + 1)))
    else:
        setattr(message, name, draw(_scalar(field)))


@st.composite
def random_message(draw, message_class, depth: int = 0):
    """A message of `message_class` with a random subset of its fields set, nested messages
    down to MAX_DEPTH."""
    message = message_class()
    for field in message_class.DESCRIPTOR.fields:
        if _is_message(field) and depth >= MAX_DEPTH:
            continue
        if draw(st.booleans()):
            _fill_field(draw, message, field, depth)
    return message


def messages(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    return random_message(message_factory.GetMessageClass(field.message_type), depth)


PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=IDS)
@PROPERTY
@given(data=st.data())
def test_our_random_messages_are_tf_servings_bytes(ours, theirs, data):
    message = data.draw(random_message(ours))
    wire = message.SerializeToString()

    parsed = theirs.FromString(wire)

    assert parsed.SerializeToString(deterministic=True) == message.SerializeToString(
        deterministic=True
    )
    assert ours.FromString(parsed.SerializeToString()) == message


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=IDS)
@PROPERTY
@given(data=st.data())
def test_tf_servings_random_messages_parse_into_ours_and_back(ours, theirs, data):
    """TF's messages have fields ours leave out (request options, composite tensors): those
    survive as unknown fields, so the message still round-trips whole."""
    message = data.draw(random_message(theirs))

    parsed = ours.FromString(message.SerializeToString())

    assert theirs.FromString(parsed.SerializeToString()) == message


# --- what the client and the embedded server really send ------------------------------------


def test_the_clients_predict_request_is_tf_servings():
    spec = LoadSpec("127.0.0.1:1", "grpc", MODEL, {"images": images(2)}, version=2, count=1)
    wire = predict_request_bytes(spec)
    expected = tf_predict_pb2.PredictRequest()
    expected.model_spec.name = MODEL
    expected.model_spec.signature_name = "serving_default"
    expected.model_spec.version.value = 2
    expected.inputs["images"].CopyFrom(
        to_tensor_proto(images(2), proto_type=tf_tensor_pb2.TensorProto)
    )

    assert wire == expected.SerializeToString()


def _raw_call(target: str, method: str, request) -> bytes:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=None
        )
        return call(request, timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "request_class", "ours", "theirs"),
    [
        (
            "Predict",
            predict_pb2.PredictRequest,
            predict_pb2.PredictResponse,
            tf_predict_pb2.PredictResponse,
        ),
        (
            "GetModelMetadata",
            get_model_metadata_pb2.GetModelMetadataRequest,
            get_model_metadata_pb2.GetModelMetadataResponse,
            tf_metadata_pb2.GetModelMetadataResponse,
        ),
    ],
)
def test_the_embedded_servers_answers_parse_the_same_with_ours(
    server, method, request_class, ours, theirs
):
    request = request_class()
    request.model_spec.name = MODEL
    if method == "Predict":
        request.inputs["images"].CopyFrom(to_tensor_proto(images(3)))
    else:
        request.metadata_field.append("signature_def")

    wire = _raw_call(server.target, f"/tensorflow.serving.PredictionService/{method}", request)

    mine, reference = ours.FromString(wire), theirs.FromString(wire)
    assert mine.SerializeToString(deterministic=True) == reference.SerializeToString(
        deterministic=True
    )
    assert len(unknown_fields.UnknownFieldSet(mine)) == 0


@pytest.mark.slow
def test_the_embedded_servers_status_parses_the_same_with_ours(server):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL

    wire = _raw_call(server.target, "/tensorflow.serving.ModelService/GetModelStatus", request)

    mine = get_model_status_pb2.GetModelStatusResponse.FromString(wire)
    reference = tf_status_pb2.GetModelStatusResponse.FromString(wire)
    assert mine.SerializeToString(deterministic=True) == reference.SerializeToString(
        deterministic=True
    )
    assert [status.version for status in mine.model_version_status] == [2, 1]


# --- the shared tensor codec over both classes ----------------------------------------------

CLASSES = [tensor_pb2.TensorProto, tf_tensor_pb2.TensorProto]


@pytest.mark.parametrize("proto_type", CLASSES, ids=["ours", "tensorflow"])
@pytest.mark.parametrize("encode", [to_tensor_proto, to_typed_tensor_proto])
@pytest.mark.parametrize(
    "value",
    [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, -2], np.int8), [b"a", b"\0b"]],
    ids=["float32", "int8", "strings"],
)
def test_the_codec_builds_and_reads_either_tensor_proto(proto_type, encode, value):
    proto = encode(value, proto_type=proto_type)
    other = CLASSES[1] if proto_type is CLASSES[0] else CLASSES[0]

    assert type(proto) is proto_type
    np.testing.assert_array_equal(to_ndarray(proto), np.asarray(value, dtype=None))
    np.testing.assert_array_equal(
        to_ndarray(other.FromString(proto.SerializeToString())), to_ndarray(proto)
    )


# --- one process, both worlds ---------------------------------------------------------------

CLIENT_FIRST = """
import sys
from convstack.client.sync_client import PredictionClient
from convstack.client.tensors import to_tensor_proto
assert "tensorflow" not in sys.modules, "the client imported TensorFlow"
from tensorflow_serving.apis import predict_pb2
from tensorflow.core.framework import tensor_pb2
"""
TF_FIRST = """
from tensorflow_serving.apis import predict_pb2
from tensorflow.core.framework import tensor_pb2
from convstack.client.sync_client import PredictionClient
from convstack.client.tensors import to_tensor_proto
"""
BOTH_WORK = """
from convstack.client.wire import predict_pb2 as ours
request = predict_pb2.PredictRequest()
request.inputs["x"].CopyFrom(to_tensor_proto([1.0, 2.0], proto_type=tensor_pb2.TensorProto))
mine = ours.PredictRequest()
mine.inputs["x"].CopyFrom(to_tensor_proto([1.0, 2.0]))
assert mine.SerializeToString() == request.SerializeToString()
with PredictionClient("127.0.0.1:1", "m", timeout=1, retries=0):
    pass
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("first", [CLIENT_FIRST, TF_FIRST], ids=["client-first", "tf-first"])
def test_both_import_orders_work_in_one_process(first):
    result = subprocess.run(
        [sys.executable, "-c", first + BOTH_WORK],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


# --- generated code -------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="needs grpcio-tools")
def test_regenerating_the_wire_code_changes_nothing(tmp_path):
    """What `make protos` does, into a scratch folder: the committed *_pb2.py must match."""
    staged = tmp_path / "convstack" / "client" / "wire"
    staged.mkdir(parents=True)
    protos = sorted(WIRE.glob("*.proto"))
    for proto in protos:
        shutil.copy(proto, staged / proto.name)
    names = [f"convstack/client/wire/{proto.name}" for proto in protos]

    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", *names],
        cwd=tmp_path,
        check=True,
    )

    generated = {path.name: path.read_bytes() for path in staged.glob("*_pb2.py")}
    committed = {path.name: path.read_bytes() for path in WIRE.glob("*_pb2.py")}
    assert generated.keys() == committed.keys()
    stale = sorted(name for name in generated if generated[name] != committed[name])
    assert stale == [], f"run `make protos`: {stale} differ"


# --- TF Serving's messages handed to the client ---------------------------------------------


def test_a_tf_serving_model_server_config_is_taken_by_its_bytes():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2 as tf_config_pb2

    from convstack.client.sync_client import parse_model_server_config

    text = (
        'model_config_list { config { name: "a" base_path: "/m/a" model_platform: "tensorflow" '
        "model_version_policy { specific { versions: 1 versions: 2 } } "
        'version_labels { key: "stable" value: 1 } } }'
    )
    theirs = text_format.Parse(text, tf_config_pb2.ModelServerConfig())

    ours = parse_model_server_config(theirs)

    assert type(ours) is model_management_pb2.ModelServerConfig
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert parse_model_server_config(text) == ours


def test_the_signature_map_is_read_from_tf_servings_any():
    from convstack.client.errors import PredictionError
    from convstack.client.sync_client import signature_def_map

    theirs = tf_metadata_pb2.SignatureDefMap()
    theirs.signature_def["serving_default"].method_name = "tensorflow/serving/predict"
    response = tf_metadata_pb2.GetModelMetadataResponse()
    response.metadata["signature_def"].Pack(theirs)
    ours = get_model_metadata_pb2.GetModelMetadataResponse.FromString(response.SerializeToString())

    found = signature_def_map(ours)

    assert found.signature_def["serving_default"].method_name == "tensorflow/serving/predict"
    with pytest.raises(PredictionError, match="without signature_def"):
        signature_def_map(get_model_metadata_pb2.GetModelMetadataResponse())
