"""Server-side batching (merging, a full queue, deadlines), health and metrics, and graceful
shutdown on SIGTERM."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_management_pb2

from convstack.serving.model_config import parse_model_config
from tests.serving.conformance.conftest import MODEL
from tests.serving.conformance.requests import images, predict_request
from tests.serving.helpers import make_repository

pytestmark = pytest.mark.slow


def batching_file(tmp_path, **values) -> str:
    path = tmp_path / "batching.config"
    path.write_text("".join(f"{key} {{ value: {value} }}\n" for key, value in values.items()))
    return str(path)


def metric(server, name: str) -> float:
    status, text = server.rest("GET", "/monitoring/prometheus/metrics")
    assert status == 200
    total = 0.0
    for line in text.splitlines():
        if re.match(rf"{re.escape(name)}(\{{.*\}})? ", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def serve(tmp_path, start_server, exported_version, monitoring_file, **batching):
    model_dir = make_repository(tmp_path / "models", exported_version, [1])
    return start_server(
        [
            f"--model_name={MODEL}",
            f"--model_base_path={model_dir}",
            "--enable_batching",
            f"--batching_parameters_file={batching_file(tmp_path, **batching)}",
            f"--monitoring_config_file={monitoring_file}",
        ]
    )


def test_concurrent_requests_are_merged_into_batches(
    tmp_path, start_server, exported_version, monitoring_file
):
    server = serve(
        tmp_path,
        start_server,
        exported_version,
        monitoring_file,
        max_batch_size=8,
        batch_timeout_micros=500_000,
        num_batch_threads=1,
        max_enqueued_batches=16,
    )
    runs_before = metric(server, ":tensorflow:serving:batching_session:wrapped_run_count")
    stub = server.prediction()
    single = images(8)
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(
                lambda i: stub.Predict(predict_request({"images": single[i : i + 1]}), timeout=30),
                range(8),
            )
        )
    runs = metric(server, ":tensorflow:serving:batching_session:wrapped_run_count") - runs_before
    assert len(replies) == 8 and all(
        r.outputs["classes"].tensor_shape.dim[0].size == 1 for r in replies
    )
    assert 1 <= runs < 8, f"8 concurrent requests ran in {runs} batches"


def test_a_full_batch_queue_rejects_with_unavailable(
    tmp_path, start_server, exported_version, monitoring_file
):
    server = serve(
        tmp_path,
        start_server,
        exported_version,
        monitoring_file,
        max_batch_size=64,
        batch_timeout_micros=2_000_000,
        num_batch_threads=1,
        max_enqueued_batches=1,
    )
    stub = server.prediction()
    big = np.repeat(images(1), 64, axis=0)

    def call(_):
        try:
            stub.Predict(predict_request({"images": big}), timeout=60)
            return "OK"
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"

    with ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(call, range(32)))
    rejected = [o for o in outcomes if o != "OK"]
    assert rejected, "32 concurrent full batches with room for one queued batch must overflow"
    full = "UNAVAILABLE: The batch scheduling queue to which this task was submitted is full"
    assert all(o.startswith(full) for o in rejected), rejected
    assert "OK" in outcomes
    assert stub.Predict(predict_request(), timeout=30).outputs


def test_a_request_whose_deadline_passed_is_not_run(
    tmp_path, start_server, exported_version, monitoring_file
):
    server = serve(
        tmp_path,
        start_server,
        exported_version,
        monitoring_file,
        max_batch_size=8,
        batch_timeout_micros=1_000_000,
        num_batch_threads=1,
    )
    runs = ":tensorflow:serving:batching_session:wrapped_run_count"
    rows = ":tensorflow:serving:batching_session:input_batch_size_sum"
    runs_before, rows_before = metric(server, runs), metric(server, rows)
    with pytest.raises(grpc.RpcError) as caught:
        server.prediction().Predict(predict_request({"images": images(3)}), timeout=0.2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # A live request queued after it waits for the same batch window; when it has its answer,
    # that batch has run, and it held the live request's 2 rows only, not the expired 3.
    reply = server.prediction().Predict(predict_request({"images": images(2)}), timeout=60)
    assert len(reply.outputs["classes"].int64_val) == 2
    assert metric(server, runs) - runs_before == 1
    assert metric(server, rows) - rows_before == 2


def test_health_follows_model_availability(tmp_path, start_server, exported_version):
    model_dir = make_repository(tmp_path / "models", exported_version, [1])
    server = start_server([f"--model_name={MODEL}", f"--model_base_path={model_dir}"])
    if server.backend != "embedded":
        pytest.skip("TF Serving's health service is not model-aware; convstack's is")
    health = health_pb2_grpc.HealthStub(server.channel())
    check = health_pb2.HealthCheckRequest
    assert (
        health.Check(check(service=""), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    )
    assert (
        health.Check(check(service=MODEL), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )

    empty = tmp_path / "empty"
    empty.mkdir()
    config = parse_model_config(
        f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{model_dir}" '
        'model_platform: "tensorflow" } '
        f'config {{ name: "ghost" base_path: "{empty}" model_platform: "tensorflow" }} }}'
    )
    server.models().HandleReloadConfigRequest(
        model_management_pb2.ReloadConfigRequest(config=config), timeout=60
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (
            health.Check(check(service=""), timeout=10).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        ):
            break
        time.sleep(0.2)
    assert (
        health.Check(check(service=""), timeout=10).status
        == health_pb2.HealthCheckResponse.NOT_SERVING
    )
    assert server.rest("GET", "/readyz")[0] == 503
    assert server.prediction().Predict(predict_request(), timeout=10).outputs


def test_health_answers_the_service_names_tf_serving_marks_serving(
    tmp_path, start_server, exported_version
):
    """TF Serving's --enable_grpc_healthcheck_service marks "ModelService" and
    "PredictionService" SERVING once it starts: a client's health check written for those names
    must pass here too."""
    model_dir = make_repository(tmp_path / "models", exported_version, [1])
    server = start_server(
        [
            f"--model_name={MODEL}",
            f"--model_base_path={model_dir}",
            "--enable_grpc_healthcheck_service=true",
        ]
    )
    health = health_pb2_grpc.HealthStub(server.channel())
    for service in ("", "ModelService", "PredictionService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as unknown:
        health.Check(health_pb2.HealthCheckRequest(service="NoSuchService"), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_service_turned_off_is_not_served(tmp_path, start_server, exported_version):
    model_dir = make_repository(tmp_path / "models", exported_version, [1])
    server = start_server(
        [
            f"--model_name={MODEL}",
            f"--model_base_path={model_dir}",
            "--enable_grpc_healthcheck_service=false",
        ]
    )
    health = health_pb2_grpc.HealthStub(server.channel())
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert server.prediction().Predict(predict_request(), timeout=10).outputs


def test_sigterm_finishes_in_flight_requests_and_exits_0(
    tmp_path, start_server, exported_version, monitoring_file
):
    server = serve(
        tmp_path,
        start_server,
        exported_version,
        monitoring_file,
        max_batch_size=64,
        batch_timeout_micros=1_500_000,
        num_batch_threads=1,
    )
    outcome: dict[str, object] = {}

    def slow_request():
        try:
            reply = server.prediction().Predict(predict_request({"images": images(1)}), timeout=30)
            outcome["version"] = reply.model_spec.version.value
        except grpc.RpcError as error:
            outcome["error"] = f"{error.code()}: {error.details()}"

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.5)  # the request now waits in the batch queue
    # stop() kills after 30 s, which would end in a non-zero status: the hang guard.
    assert server.stop(timeout=30) == 0
    thread.join()
    assert outcome == {"version": 1}
    with pytest.raises(grpc.RpcError):
        server.prediction().Predict(predict_request(), timeout=2)
