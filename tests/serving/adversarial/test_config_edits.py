"""Concurrent `convstack models-config` edits of the config the server polls, with traffic
running: every edit lands in the file (nothing lost), the server serves exactly the edited
config, and the model it kept never stops answering correctly. A config that does not parse
leaves the server on the previous one."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from tensorflow_serving.apis import predict_pb2

from convstack.serving import model_config
from tests.serving.adversarial.conftest import CALL_TIMEOUT, assert_bounded_growth
from tests.serving.conformance.conftest import MODEL
from tests.serving.conformance.requests import predict_request, status_request
from tests.serving.helpers import make_repository

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[3]
SERVE_SECONDS = 120.0  # generous: loads on a loaded machine; only a bound on waiting


def edit(config: Path, *args: str) -> subprocess.Popen:
    """`convstack models-config <args>` in a process of its own, as a user runs it."""
    verb, *rest = args
    command = [sys.executable, "-m", "convstack.cli", "models-config", verb]
    return subprocess.Popen(
        [*command, "--config", str(config), *rest],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_concurrently(target, edits: list[tuple[str, ...]]) -> None:
    """Start every edit at once; each must exit 0 (an attempt each)."""
    processes = [edit(target.config_path, *args) for args in edits]
    for args, process in zip(edits, processes, strict=True):
        _, stderr = process.communicate(timeout=SERVE_SECONDS)
        target.record(f"models-config {' '.join(args)}", process.returncode, {0})
        assert process.returncode == 0, stderr


def configured(target) -> set[str]:
    config = model_config.load_model_config(target.config_path)
    return {model.name for model in config.model_config_list.config}


def served(target, name: str) -> bool:
    try:
        reply = target.server.models().GetModelStatus(status_request(name), timeout=CALL_TIMEOUT)
    except grpc.RpcError:
        return False
    return any(status.state == 30 for status in reply.model_version_status)


def wait_for(target, names_up: set[str], names_down: set[str]) -> None:
    deadline = time.monotonic() + SERVE_SECONDS
    while time.monotonic() < deadline:
        if all(served(target, n) for n in names_up) and not any(
            served(target, n) for n in names_down
        ):
            return
        time.sleep(0.5)
    raise AssertionError(f"the server never served {names_up} without {names_down}")


class Traffic:
    """Predicts on the model no edit touches, in a thread, each one checked against the
    golden answer (the comparison is of outputs: the response names the model)."""

    def __init__(self, target) -> None:
        self._target = target
        self._stop = threading.Event()
        self.failures: list[str] = []
        self.count = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=CALL_TIMEOUT * 2)

    def _run(self) -> None:
        predict = self._target.server.prediction().Predict
        golden = predict_pb2.PredictResponse.FromString(self._target.golden).outputs
        while not self._stop.is_set():
            self.count += 1
            try:
                reply = predict(predict_request(), timeout=CALL_TIMEOUT)
                if reply.outputs != golden:
                    self.failures.append("a different answer")
            except grpc.RpcError as error:
                self.failures.append(f"{error.code().name}: {error.details()[:200]}")


def same_outputs(target, name: str) -> bool:
    reply = target.server.prediction().Predict(predict_request(name=name), timeout=CALL_TIMEOUT)
    return reply.outputs == predict_pb2.PredictResponse.FromString(target.golden).outputs


def test_concurrent_edits_all_land_and_are_served(target, exported_version):
    root = target.model_dir.parent
    for index in range(5):
        make_repository(root, exported_version, [1], name=f"m{index}")
    with Traffic(target) as traffic:
        run_concurrently(
            target,
            [("add", "--name", f"m{i}", "--base-path", str(root / f"m{i}")) for i in range(4)],
        )
        assert configured(target) == {MODEL, "m0", "m1", "m2", "m3"}, "an edit was lost"
        wait_for(target, {MODEL, "m0", "m1", "m2", "m3"}, set())
        assert all(same_outputs(target, f"m{i}") for i in range(4))

        run_concurrently(
            target,
            [
                ("remove", "--name", "m0"),
                ("remove", "--name", "m1"),
                ("add", "--name", "m4", "--base-path", str(root / "m4")),
            ],
        )
        assert configured(target) == {MODEL, "m2", "m3", "m4"}, "an edit was lost"
        wait_for(target, {MODEL, "m2", "m3", "m4"}, {"m0", "m1"})
    target.tally.attempts += traffic.count
    assert traffic.failures == [], traffic.failures[:5]
    target.check_golden()


def test_a_config_that_does_not_parse_keeps_the_previous_one(target):
    good = target.config_path.read_bytes()
    target.config_path.write_bytes(b"model_config_list { config { name: \xff\x00 ")
    time.sleep(3)  # three polls; the server must log and keep serving
    target.record("a garbage models.config", "OK" if served(target, MODEL) else "LOST", {"OK"})
    target.check_golden()
    target.config_path.write_bytes(good)


def test_the_server_kept_its_answer_and_its_memory(target):
    assert_bounded_growth(target)
