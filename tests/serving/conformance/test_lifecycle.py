"""Model lifecycle: version discovery by polling, availability-preserving swaps, failed loads,
policies, labels, config reload (RPC and file polling), warmup."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import pytest
from tensorflow_serving.apis import model_management_pb2

from convstack.serving.model_config import parse_model_config
from tests.serving.conformance.conftest import MODEL, write_config
from tests.serving.conformance.requests import predict_request, status_request, versions_by_state
from tests.serving.helpers import make_repository

pytestmark = pytest.mark.slow

POLL = [
    "--file_system_poll_wait_seconds=1",
    "--load_retry_interval_micros=200000",
    "--max_num_load_retries=1",
]


def wait_until(predicate, timeout: float = 60, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {message}")


def states(server, name: str = MODEL) -> dict[int, str]:
    return versions_by_state(server.models().GetModelStatus(status_request(name), timeout=10))


def test_new_version_is_picked_up_and_swapped_without_failed_requests(
    tmp_path, start_server, exported_version
):
    model_dir = make_repository(tmp_path / "models", exported_version, [1])
    server = start_server([f"--model_name={MODEL}", f"--model_base_path={model_dir}", *POLL])
    failures: list[str] = []
    served: set[int] = set()
    stop = threading.Event()

    def hammer():
        stub = server.prediction()
        while not stop.is_set():
            try:
                served.add(stub.Predict(predict_request(), timeout=10).model_spec.version.value)
            except grpc.RpcError as error:
                failures.append(f"{error.code()}: {error.details()}")

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(0.5)
        shutil.copytree(exported_version, model_dir / ".incoming")  # not numeric: ignored
        (model_dir / ".incoming").rename(model_dir / "2")
        wait_until(lambda: states(server).get(2) == "AVAILABLE", message="version 2")
        wait_until(lambda: states(server).get(1) == "END", message="version 1 to unload")
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert served == {1, 2}
    assert server.prediction().Predict(predict_request()).model_spec.version.value == 2


def test_a_corrupt_version_ends_with_its_error_while_others_serve(
    tmp_path, start_server, exported_version
):
    model_dir = make_repository(tmp_path / "models", exported_version, [1])
    broken = model_dir / "2"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    config = write_config(
        tmp_path / "models.config", [(MODEL, model_dir)], "model_version_policy { all {} }"
    )
    server = start_server([f"--model_config_file={config}", *POLL])
    wait_until(lambda: states(server).get(2) == "END", message="version 2 to fail")
    reply = server.models().GetModelStatus(status_request(version=2), timeout=10)
    assert reply.model_version_status[0].status.error_code != 0
    assert reply.model_version_status[0].status.error_message
    assert server.prediction().Predict(predict_request()).model_spec.version.value == 1


def test_version_policies_and_reload_serve_exactly_the_new_config(
    tmp_path, start_server, exported_version
):
    model_dir = make_repository(tmp_path / "models", exported_version, [1, 2, 3])
    other_dir = make_repository(tmp_path / "other", exported_version, [5])
    config = write_config(
        tmp_path / "models.config",
        [(MODEL, model_dir)],
        "model_version_policy { specific { versions: 1 versions: 3 } }",
    )
    server = start_server([f"--model_config_file={config}", *POLL])
    assert states(server) == {3: "AVAILABLE", 1: "AVAILABLE"}

    # Reload: keep tiny with latest{2} and a label, add "other"; labels need AVAILABLE targets.
    new_config = parse_model_config(
        f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{model_dir}" '
        'model_platform: "tensorflow" model_version_policy { latest { num_versions: 2 } } } '
        f'config {{ name: "other" base_path: "{other_dir.parent / MODEL}" '
        'model_platform: "tensorflow" } }'
    )
    request = model_management_pb2.ReloadConfigRequest(config=new_config)
    server.models().HandleReloadConfigRequest(request, timeout=60)
    wait_until(
        lambda: states(server) == {3: "AVAILABLE", 2: "AVAILABLE", 1: "END"}, message="latest 2"
    )
    server.wait_available("other")

    # A label on a version that is not available is refused and changes nothing.
    bad = model_management_pb2.ReloadConfigRequest(config=new_config)
    bad.config.model_config_list.config[0].version_labels["stable"] = 1
    with pytest.raises(grpc.RpcError) as caught:
        server.models().HandleReloadConfigRequest(bad, timeout=60)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        f"Request to assign label to version 1 of model {MODEL}, which is not currently "
        "available for inference" in caught.value.details()
    )
    assert server.prediction().Predict(predict_request()).model_spec.version.value == 3

    # Dropping a model unloads it.
    only_other = model_management_pb2.ReloadConfigRequest(config=new_config)
    del only_other.config.model_config_list.config[0]
    server.models().HandleReloadConfigRequest(only_other, timeout=60)
    with pytest.raises(grpc.RpcError) as caught:
        server.prediction().Predict(predict_request(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_config_file_changes_are_polled(tmp_path, start_server, exported_version):
    model_dir = make_repository(tmp_path / "models", exported_version, [1, 2])
    config = write_config(
        tmp_path / "models.config",
        [(MODEL, model_dir)],
        "model_version_policy { specific { versions: 1 } }",
    )
    server = start_server(
        [f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=1", *POLL]
    )
    assert states(server) == {1: "AVAILABLE"}
    write_config(
        config,
        [(MODEL, model_dir)],
        "model_version_policy { specific { versions: 1 versions: 2 } } "
        'version_labels { key: "stable" value: 1 }',
    )
    wait_until(lambda: states(server).get(2) == "AVAILABLE", message="the polled config")
    reply = server.prediction().Predict(predict_request(label="stable"), timeout=10)
    assert reply.model_spec.version.value == 1


def test_a_corrupt_warmup_file_fails_the_load(tmp_path, start_server, exported_version):
    model_dir = make_repository(tmp_path / "models", exported_version, [1, 2])
    warmup = model_dir / "2" / "assets.extra" / "tf_serving_warmup_requests"
    warmup.write_bytes(b"\x00garbage that is not a TFRecord of PredictionLogs")
    config = write_config(
        tmp_path / "models.config", [(MODEL, model_dir)], "model_version_policy { all {} }"
    )
    server = start_server([f"--model_config_file={config}", *POLL])
    wait_until(lambda: states(server).get(2) == "END", message="version 2 to fail warmup")
    assert states(server)[1] == "AVAILABLE"
