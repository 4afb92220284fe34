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
        ({"protocol": "http"}, "protocol is grpc or rest"),
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
