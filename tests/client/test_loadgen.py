"""client.loadgen: request building and schedules alone, then closed and open loops against a
real embedded server (one per module) serving the tiny exported model, over gRPC and REST."""

from __future__ import annotations

import asyncio
import json
import math
import socket

import numpy as np
import pytest

from convstack.client import _protos
from convstack.client.loadgen import (
    CLIENT_OVERLOAD,
    LoadResult,
    LoadSpec,
    arrival_offsets,
    model_infer_request_bytes,
    predict_request_bytes,
    rest_predict_body,
    rest_predict_url,
    run_load,
    run_load_sync,
)
from convstack.client.tensors import to_ndarray

IMAGES = np.random.default_rng(0).uniform(0, 1, size=(2, 28, 28, 1)).astype(np.float32)
INPUTS = {"images": IMAGES}


def spec(target="127.0.0.1:1", protocol="grpc", **overrides) -> LoadSpec:
    fields = {"model_name": "tiny", "inputs": INPUTS, "warmup_requests": 1, **overrides}
    return LoadSpec(target, protocol, **fields)


# --- the spec, requests and schedules (no server) ---------------------------------------------


def test_spec_defaults_to_one_worker_for_ten_seconds():
    default = spec()
    assert (default.concurrency, default.rate, default.duration, default.count) == (
        1,
        None,
        10.0,
        None,
    )
    assert not default.open_loop
    open_loop = spec(rate=5.0, count=3)
    assert (open_loop.concurrency, open_loop.duration, open_loop.open_loop) == (None, None, True)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"concurrency": 2, "rate": 10.0}, "concurrency or rate"),
        ({"duration": 1.0, "count": 10}, "duration or count"),
        ({"version": 1, "version_label": "stable"}, "version or version_label"),
        ({"concurrency": 0}, "concurrency must be >= 1"),
        ({"rate": 0.0}, "rate must be > 0"),
        ({"count": 0}, "count must be >= 1"),
        ({"inputs": {}}, "inputs is empty"),
        ({"protocol": "http"}, "protocol is one of grpc, rest, grpc-v2"),
        ({"protocol": "rest"}, "REST target starts with http://"),
        ({"target": "http://127.0.0.1:1"}, "gRPC target is host:port"),
    ],
)
def test_spec_rejects_contradictions(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        spec(**overrides)


def test_grpc_request_is_built_once_with_the_model_spec_and_inputs():
    request = _protos.predict_pb2.PredictRequest.FromString(
        predict_request_bytes(spec(version_label="canary", signature_name="sig"))
    )
    assert request.model_spec.name == "tiny"
    assert request.model_spec.signature_name == "sig"
    assert request.model_spec.version_label == "canary"
    assert not request.model_spec.HasField("version")
    np.testing.assert_array_equal(to_ndarray(request.inputs["images"]), IMAGES)
    pinned = _protos.predict_pb2.PredictRequest.FromString(predict_request_bytes(spec(version=3)))
    assert pinned.model_spec.version.value == 3


def test_rest_body_is_columnar_json_and_url_selects_version_or_label():
    strings = {"image_bytes": np.array([b"\x89PNG", b"\x00"], dtype=object), "k": IMAGES[:1]}
    body = json.loads(rest_predict_body(spec("http://h:1", "rest", inputs=strings)))
    assert body["signature_name"] == "serving_default"
    assert body["inputs"]["image_bytes"] == [{"b64": "iVBORw=="}, {"b64": "AA=="}]
    np.testing.assert_array_equal(np.array(body["inputs"]["k"], np.float32), IMAGES[:1])
    assert rest_predict_url(spec("http://h:1/", "rest")) == "http://h:1/v1/models/tiny:predict"
    assert rest_predict_url(spec("http://h:1", "rest", version=2)).endswith(
        "/models/tiny/versions/2:predict"
    )
    assert rest_predict_url(spec("http://h:1", "rest", version_label="stable")).endswith(
        "/models/tiny/labels/stable:predict"
    )


def test_constant_arrivals_are_evenly_spaced():
    offsets = arrival_offsets(spec(rate=50.0, duration=1.0, arrival="constant"))
    np.testing.assert_allclose(offsets, np.arange(50) / 50)
    assert len(arrival_offsets(spec(rate=50.0, count=7, arrival="constant"))) == 7


def test_poisson_arrivals_start_at_once_and_stay_in_the_window():
    offsets = arrival_offsets(spec(rate=200.0, duration=5.0, seed=3))
    assert offsets[0] == 0.0 and offsets[-1] < 5.0
    assert np.all(np.diff(offsets) >= 0)
    # 1000 expected; a Poisson count of mean 1000 has sd ~32.
    assert 800 < len(offsets) < 1200
    counted = arrival_offsets(spec(rate=200.0, count=10))
    assert len(counted) == 10 and counted[0] == 0.0


def test_result_json_turns_missing_latencies_into_null():
    result = LoadResult(
        requests=2,
        ok=0,
        errors={"NOT_FOUND": 2},
        seconds=0.1,
        throughput=0.0,
        latency_ms=dict.fromkeys(("p50", "p90", "p99", "max", "mean"), math.nan),
    )
    assert json.loads(json.dumps(result.to_json()))["latency_ms"]["p99"] is None


def test_rest_row_body_is_tf_servings_instances():
    one = json.loads(rest_predict_body(spec("http://h:1", "rest", rest_format="row")))
    assert set(one) == {"signature_name", "instances"}
    np.testing.assert_array_equal(np.array(one["instances"], np.float32), IMAGES)
    two = {"a": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "b": np.array([b"x", b"y"], object)}
    body = json.loads(rest_predict_body(spec("http://h:1", "rest", inputs=two, rest_format="row")))
    assert body["instances"] == [
        {"a": [1.0, 2.0], "b": {"b64": "eA=="}},
        {"a": [3.0, 4.0], "b": {"b64": "eQ=="}},
    ]
    with pytest.raises(ValueError, match="rest_format is columnar or row"):
        spec(rest_format="rows")


def test_v2_request_carries_raw_little_endian_inputs_and_a_string_version():
    from convstack.client.wire import inference_v2_pb2

    request = inference_v2_pb2.ModelInferRequest.FromString(
        model_infer_request_bytes(spec(protocol="grpc-v2", version=3))
    )
    assert (request.model_name, request.model_version) == ("tiny", "3")
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("images", "FP32", [2, 28, 28, 1])
    decoded = np.frombuffer(request.raw_input_contents[0], "<f4").reshape(IMAGES.shape)
    np.testing.assert_array_equal(decoded, IMAGES)
    with pytest.raises(ValueError, match="no version labels"):
        model_infer_request_bytes(spec(protocol="grpc-v2", version_label="stable"))
    with pytest.raises(ValueError, match="not a v2 numeric type"):
        model_infer_request_bytes(spec(protocol="grpc-v2", inputs={"s": np.array([b"x"], object)}))
    with pytest.raises(ValueError, match="protocol is one of grpc, rest, grpc-v2"):
        spec(protocol="grpc2")


def test_v2_requests_reach_a_model_infer_server_and_its_errors_are_counted():
    """A loopback gRPC server with the v2 ModelInfer method: what arrives is the request built
    once; an unknown model answers NOT_FOUND, counted by name."""
    import grpc

    from convstack.client.wire import inference_v2_pb2

    received = []

    async def infer(request_bytes, context):
        request = inference_v2_pb2.ModelInferRequest.FromString(request_bytes)
        received.append(request)
        if request.model_name != "tiny":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        response = inference_v2_pb2.ModelInferResponse(model_name="tiny")
        response.outputs.add(name="y", datatype="FP32", shape=[2, 10])
        response.raw_output_contents.append(np.zeros((2, 10), "<f4").tobytes())
        return response.SerializeToString()

    async def scenario():
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)},
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            target = f"127.0.0.1:{port}"
            ok = await run_load(spec(target, "grpc-v2", concurrency=2, count=6))
            missing = await run_load(spec(target, "grpc-v2", model_name="nope", count=3))
        finally:
            await server.stop(None)
        return ok, missing

    ok, missing = asyncio.run(scenario())
    assert (ok.requests, ok.ok, ok.errors) == (6, 6, {})
    assert missing.errors == {"NOT_FOUND": 3}
    first = received[0]
    assert first.inputs[0].name == "images" and list(first.inputs[0].shape) == [2, 28, 28, 1]


# --- against a real server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One embedded server for the module, serving tiny version 1."""
    from convstack.bench.serve import ServerProcess
    from tests.serving.helpers import make_model_dir

    root = tmp_path_factory.mktemp("loadgen")
    model_dir = make_model_dir(root / "models")
    process = ServerProcess.start("tiny", model_dir, root / "server.log")
    try:
        process.wait_available("tiny")
        yield process
    finally:
        assert process.stop() == 0, process.log_tail()


def _assert_percentiles_ordered(result: LoadResult) -> None:
    latency = result.latency_ms
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert 0 < latency["mean"] <= latency["max"]


@pytest.mark.slow
def test_closed_loop_over_grpc_sends_exactly_count_requests(server):
    result = run_load_sync(spec(server.grpc_target, concurrency=4, count=40))
    assert (result.requests, result.ok, result.errors) == (40, 40, {})
    assert result.seconds > 0
    assert result.throughput == pytest.approx(40 / result.seconds)
    _assert_percentiles_ordered(result)


@pytest.mark.slow
def test_closed_loop_over_rest_sends_exactly_count_requests(server):
    result = run_load_sync(spec(server.rest_target, "rest", concurrency=3, count=25, version=1))
    assert (result.requests, result.ok, result.errors) == (25, 25, {})
    _assert_percentiles_ordered(result)


@pytest.mark.slow
def test_row_format_body_is_served_with_the_columnar_bodys_predictions(server):
    """The row format the peer benchmark sends (KServe's v1 is TF Serving's) against our server:
    accepted, and the same predictions as the columnar body."""
    import urllib.request

    answers = {}
    for rest_format in ("columnar", "row"):
        load = spec(server.rest_target, "rest", rest_format=rest_format)
        request = urllib.request.Request(
            rest_predict_url(load),
            data=rest_predict_body(load),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answers[rest_format] = json.loads(response.read())
    columnar, row = answers["columnar"]["outputs"], answers["row"]["predictions"]
    assert isinstance(row, list) and len(row) == len(IMAGES)
    if isinstance(columnar, dict):  # several outputs: one {name: value} object per row
        for name, values in columnar.items():
            np.testing.assert_allclose([r[name] for r in row], values, rtol=1e-6)
    else:
        np.testing.assert_allclose(row, columnar, rtol=1e-6)
    result = run_load_sync(spec(server.rest_target, "rest", rest_format="row", count=10))
    assert (result.requests, result.ok, result.errors) == (10, 10, {})


@pytest.mark.slow
def test_closed_loop_for_a_duration_keeps_every_worker_busy(server):
    result = run_load_sync(spec(server.grpc_target, concurrency=2, duration=0.5))
    assert result.ok == result.requests > 2
    assert result.errors == {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("protocol", "overrides", "expected"),
    [
        ("grpc", {"model_name": "nope"}, "NOT_FOUND"),
        ("grpc", {"version": 99}, "NOT_FOUND"),
        ("grpc", {"version_label": "missing"}, "INVALID_ARGUMENT"),
        ("grpc", {"inputs": {"images": IMAGES.astype(np.float64)}}, "INVALID_ARGUMENT"),
        ("grpc", {"signature_name": "nope"}, "FAILED_PRECONDITION"),
        ("rest", {"model_name": "nope"}, "HTTP_404"),
        ("rest", {"inputs": {"wrong": IMAGES}}, "HTTP_400"),
    ],
)
def test_errors_are_counted_by_status_not_raised(server, protocol, overrides, expected):
    target = server.grpc_target if protocol == "grpc" else server.rest_target
    result = run_load_sync(spec(target, protocol, concurrency=2, count=6, **overrides))
    assert (result.requests, result.ok, result.errors) == (6, 0, {expected: 6})
    assert result.throughput == 0.0
    assert all(math.isnan(value) for value in result.latency_ms.values())


@pytest.mark.slow
def test_open_loop_sends_on_schedule(server):
    constant = run_load_sync(
        spec(server.grpc_target, rate=40.0, duration=1.5, arrival="constant", concurrency=None)
    )
    assert constant.requests == constant.ok == 60
    assert constant.seconds >= 1.45  # the last request is due at 1.475 s
    _assert_percentiles_ordered(constant)
    poisson = run_load_sync(spec(server.rest_target, "rest", rate=40.0, duration=1.5))
    assert 25 <= poisson.requests <= 100
    assert poisson.ok == poisson.requests


def test_open_loop_keeps_its_schedule_and_bounds_in_flight_requests_when_unanswered():
    """A listener that never answers: a closed loop would stall; the open loop sends every
    request on time and drops those beyond max_outstanding as CLIENT_OVERLOAD."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel accepts connections; nobody reads them
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        load = spec(
            target,
            rate=100.0,
            duration=0.5,
            arrival="constant",
            concurrency=None,
            max_outstanding=5,
            warmup_requests=0,
            timeout=2.0,
        )
        result = asyncio.run(run_load(load))
    assert (result.requests, result.ok) == (50, 0)
    assert result.errors[CLIENT_OVERLOAD] >= 40
    unanswered = result.requests - result.errors[CLIENT_OVERLOAD]
    assert unanswered >= 5
    assert set(result.errors) <= {CLIENT_OVERLOAD, "DEADLINE_EXCEEDED", "UNAVAILABLE"}
