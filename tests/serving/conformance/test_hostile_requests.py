"""Hostile requests of issue #12 (defects 2, 3, 7, 8 and 10), one case each, against one running
server: the exact status code TF Serving gives, and the same answer to a correct request after
every attack. Where a case bounds what the server keeps, its RSS growth is measured and bounded
by a generous allowance per request (never by time)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from tests.serving.conformance.conftest import MODEL, launch, write_config
from tests.serving.conformance.requests import metadata_request, predict_request, status_request
from tests.serving.helpers import make_repository
from tests.serving.memory import MIB, rss_bytes
from tests.trainer import export_helpers

pytestmark = pytest.mark.slow

RPC_TIMEOUT = 30
# The embedded server's --max_request_tensor_bytes here: [2048, 28, 28, 1] floats (6.4 MB) are
# over it, one image (3 KB) is far under it.
TENSOR_LIMIT = 1024 * 1024
# What an echoed name may make of a status message (serving/errors.py MAX_MESSAGE_CHARS).
MAX_DETAILS = 2048
GIANT = "m" * 10_000
PREDICT = "/tensorflow.serving.PredictionService/Predict"
# Every unary method of both services: each must parse its request before anything else.
METHODS = (
    PREDICT,
    "/tensorflow.serving.PredictionService/Classify",
    "/tensorflow.serving.PredictionService/Regress",
    "/tensorflow.serving.PredictionService/MultiInference",
    "/tensorflow.serving.PredictionService/GetModelMetadata",
    "/tensorflow.serving.ModelService/GetModelStatus",
    "/tensorflow.serving.ModelService/HandleReloadConfigRequest",
)


@pytest.fixture(scope="module")
def server(upstream_backend, exported_version, tmp_path_factory):
    """One server for the module: the tiny model (version 1), monitoring on."""
    root = tmp_path_factory.mktemp("hostile")
    model_dir = make_repository(root / "models", exported_version, [1])
    config = write_config(root / "models.config", [(MODEL, model_dir)])
    monitoring = root / "monitoring.config"
    monitoring.write_text(
        'prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }'
    )
    flags = [f"--model_config_file={config}", f"--monitoring_config_file={monitoring}"]
    if upstream_backend == "embedded":
        flags.append(f"--max_request_tensor_bytes={TENSOR_LIMIT}")
    server = launch(root, upstream_backend, flags, "server")
    try:
        server.wait_available(MODEL)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def golden(server) -> bytes:
    """The serialized answer to a correct Predict, before any attack."""
    return server.prediction().Predict(predict_request(), timeout=RPC_TIMEOUT).SerializeToString()


def still_serving(server, golden: bytes) -> None:
    """The server is alive and answers the correct Predict byte for byte as before."""
    assert server.process.poll() is None, server.log()
    reply = server.prediction().Predict(predict_request(), timeout=RPC_TIMEOUT)
    assert reply.SerializeToString() == golden


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=RPC_TIMEOUT)
    return caught.value


def tensor(dtype: int, dims, content: bytes = b"") -> tensor_pb2.TensorProto:
    """A TensorProto declaring `dims` of `dtype`, with `content` (no values by default)."""
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_content=content)
    proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims)
    return proto


def raw_request(name: str = MODEL, inputs=None, **spec) -> predict_pb2.PredictRequest:
    """A PredictRequest with the given TensorProtos as inputs (`spec`: version, signature)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if "version" in spec:
        request.model_spec.version.value = spec["version"]
    if "label" in spec:
        request.model_spec.version_label = spec["label"]
    request.model_spec.signature_name = spec.get("signature", "")
    for key, proto in (inputs or {}).items():
        request.inputs[key].CopyFrom(proto)
    return request


def test_declared_sizes_beyond_the_limit_are_refused_before_allocating(server, golden):
    """Defect 2: a few bytes may declare petabytes; refused with INVALID_ARGUMENT before any
    allocation (TF Serving's `tensor parsing error`, predict_util.cc), never INTERNAL."""
    if server.backend != "embedded":
        pytest.skip("--max_request_tensor_bytes is the embedded server's")
    predict = server.prediction().Predict
    attacks = {
        "petabytes of floats": tensor(types_pb2.DT_FLOAT, [1 << 40, 28, 28, 1]),
        "2**64 strings": tensor(types_pb2.DT_STRING, [1 << 62, 4]),
        "a product beyond int64": tensor(types_pb2.DT_FLOAT, [1 << 62, 1 << 62, 28, 1]),
        "a negative dimension": tensor(types_pb2.DT_FLOAT, [-1, 28, 28, 1]),
        "2048 zero-filled images": tensor(types_pb2.DT_FLOAT, [2048, 28, 28, 1]),
    }
    for what, proto in attacks.items():
        error = rpc_error(predict, raw_request(inputs={"images": proto}))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, error.details())
        assert error.details().startswith("tensor parsing error: images"), what
    still_serving(server, golden)

    # 43 bytes asking for a 2,048-image batch kept ~360 MB before; each is now refused unread.
    repeats = 20
    before = rss_bytes(server.process.pid)
    for _ in range(repeats):
        error = rpc_error(
            predict, raw_request(inputs={"images": attacks["2048 zero-filled images"]})
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    growth = rss_bytes(server.process.pid) - before
    # Generous: 16 MiB of allocator noise plus 64 KiB per request, against 6.4 MB each to run.
    assert growth <= 16 * MIB + repeats * 64 * 1024, f"RSS grew {growth / MIB:.1f} MiB"
    still_serving(server, golden)


def test_image_headers_declaring_huge_images_are_refused_before_decoding(server, golden):
    """A 389 KB PNG declares 20000 x 20000 pixels: decoding it took 1 GB of RSS and more as
    floats. The exported graph reads the header first and answers INVALID_ARGUMENT."""
    bomb = np.array([export_helpers.png_declaring(20_000, 20_000)], dtype=object)
    request = predict_request({"image_bytes": bomb}, signature="predict_image_bytes")
    predict = server.prediction().Predict

    repeats = 5
    before = rss_bytes(server.process.pid)
    for _ in range(repeats):
        error = rpc_error(predict, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "image_bytes: the images declare 400000000 pixels in all" in error.details()
    growth = rss_bytes(server.process.pid) - before
    # Generous against the 400 MB each would take to decode: the request bytes, parsed.
    assert growth <= 64 * MIB, f"RSS grew {growth / MIB:.1f} MiB"
    still_serving(server, golden)


def test_model_version_and_signature_resolve_before_tensors_are_parsed(server, golden):
    """Defect 3: TF Serving resolves the servable (predict_impl.cc), then the signature
    (predict_util.cc GetSignatureDef), then checks the input aliases, and parses tensors last:
    so the code is the first check's, whatever the tensors hold."""
    predict = server.prediction().Predict
    bad_dtype = {"images": tensor(999, [1, 28, 28, 1])}
    three_bytes = {"images": tensor(types_pb2.DT_FLOAT, [1, 28, 28, 1], b"\x01\x02\x03")}
    cases = [
        (raw_request("nope", bad_dtype), grpc.StatusCode.NOT_FOUND,
         "Servable not found for request: Latest(nope)"),
        (raw_request(MODEL, bad_dtype, version=99), grpc.StatusCode.NOT_FOUND,
         f"Servable not found for request: Specific({MODEL}, 99)"),
        (raw_request(MODEL, bad_dtype, label="nolabel"), grpc.StatusCode.INVALID_ARGUMENT,
         "Unrecognized servable version label: nolabel"),
        (raw_request(MODEL, three_bytes, signature="nosig"), grpc.StatusCode.FAILED_PRECONDITION,
         'Serving signature key "nosig" not found.'),
        (raw_request(MODEL, {"bogus": tensor(999, [1])}), grpc.StatusCode.INVALID_ARGUMENT,
         "input tensor alias not found in signature: bogus"),
    ]  # fmt: skip
    for request, code, message in cases:
        error = rpc_error(predict, request)
        assert (error.code(), error.details()[: len(message)]) == (code, message)
        still_serving(server, golden)


def metric_model_names(server) -> set[str]:
    """The model_name label values of the request counter's series."""
    status, text = server.rest("GET", "/monitoring/prometheus/metrics")
    assert status == 200
    names = set()
    for line in text.splitlines():
        if line.startswith(":tensorflow:serving:request_count{"):
            labels = line[line.index("{") + 1 : line.index("}")]
            names.add(labels.split('model_name="', 1)[1].split('"', 1)[0])
    return names


def test_unknown_model_names_add_no_metric_series(server, golden):
    """Defect 7: labels come from requests, so made-up names must share one series (2,000
    names added 12-14 MB and 2,000 series before). Over gRPC and REST."""
    if server.backend != "embedded":
        pytest.skip("TF Serving labels its series with the requested name")
    predict = server.prediction().Predict

    def attack(start: int, count: int) -> None:
        for index in range(start, start + count):
            error = rpc_error(predict, predict_request(name=f"ghost-{index}"))
            assert error.code() == grpc.StatusCode.NOT_FOUND
        for index in range(start, start + count // 10):
            status, _ = server.rest("POST", f"/v1/models/ghost-{index}:predict", {"instances": [1]})
            assert status == 404

    attack(0, 200)  # warm the paths up before measuring
    before = rss_bytes(server.process.pid)
    requests = 3000
    attack(200, requests)
    growth = rss_bytes(server.process.pid) - before
    assert metric_model_names(server) <= {MODEL, "<unknown>"}
    # Generous: 4 MiB of allocator noise plus 1 KiB per request (a series cost ~6.5 KB).
    assert growth <= 4 * MIB + requests * 1024, f"RSS grew {growth / MIB:.1f} MiB"
    still_serving(server, golden)


def test_giant_names_are_cut_where_errors_echo_them(server, golden):
    """Defect 8: a 10k-character name echoed whole exceeded gRPC's metadata limit, so the
    client saw RESOURCE_EXHAUSTED; the code is the check's, the message is bounded."""
    prediction = server.prediction()
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (prediction.Predict, predict_request(name=GIANT), grpc.StatusCode.NOT_FOUND),
        (prediction.Predict, predict_request(signature=GIANT), grpc.StatusCode.FAILED_PRECONDITION),
        (prediction.Predict, predict_request(label=GIANT), invalid),
        (prediction.Predict, predict_request(output_filter=(GIANT,)), invalid),
        (prediction.Predict, raw_request(inputs={GIANT: tensor(1, [1])}), invalid),
        (prediction.GetModelMetadata, metadata_request(GIANT), grpc.StatusCode.NOT_FOUND),
        (server.models().GetModelStatus, status_request(GIANT), grpc.StatusCode.NOT_FOUND),
    ]  # fmt: skip
    for call, request, code in cases:
        error = rpc_error(call, request)
        assert error.code() == code, error.details()[:200]
        if server.backend == "embedded":
            assert len(error.details()) <= MAX_DETAILS
    status, body = server.rest("POST", f"/v1/models/{GIANT}:predict", {"instances": [1]})
    assert status == 404 and len(body["error"]) <= MAX_DETAILS
    still_serving(server, golden)


def test_requests_that_do_not_parse_answer_internal(server, golden):
    """Defect 10: gRPC C++ (grpcpp's GenericDeserialize, which TF Serving's server runs) answers
    INTERNAL for a request it cannot parse; grpc python answered UNKNOWN. An empty message
    parses (every field at its default) and fails the method's own checks."""
    channel = server.channel()
    for method in METHODS:
        call = channel.unary_unary(method)  # no serializers: raw bytes in and out
        for junk in (
            b"\xff\xff\xff",
            b"\x0a\x05ab",
            b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
        ):
            error = rpc_error(call, junk)
            assert error.code() == grpc.StatusCode.INTERNAL, (method, junk, error.details())
    error = rpc_error(channel.unary_unary(PREDICT), b"")
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Missing ModelSpec",
    )
    still_serving(server, golden)
