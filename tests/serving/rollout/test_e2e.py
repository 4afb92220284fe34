"""Rollouts end to end: two real embedded server replicas in subprocesses share one
models.config file (polled every second), and real exported versions are rolled out, promoted,
rolled back and retired through `serving.rollout.Rollout` and `convstack rollout`."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from convstack.client.errors import PredictionError
from convstack.client.sync_client import PredictionClient
from convstack.serving import model_config
from convstack.serving.process import ServerProcess
from convstack.serving.rollout.controller import (
    ConcurrentChangeError,
    Rollout,
    RolloutError,
    RolloutSettings,
)
from convstack.serving.rollout.gates import GateSettings, GoldenSet
from convstack.serving.rollout.history import read_history, verb_records
from convstack.serving.rollout.plan import ModelState
from convstack.serving.rollout.store import FileStore, update_config
from convstack.serving.rollout.watch import wait_for_state
from tests.serving import helpers
from tests.trainer import export_helpers

pytestmark = pytest.mark.slow

MODEL = helpers.MODEL_NAME
# A failed load is retried once after half a second (TF Serving's default: 5 times a minute apart).
SERVER_FLAGS = [
    "--model_config_file_poll_wait_seconds=1",
    "--file_system_poll_wait_seconds=1",
    "--max_num_load_retries=1",
    "--load_retry_interval_micros=500000",
]
WAIT_SECONDS = 120.0


@functools.cache
def untrained_version() -> Path:
    """A version of the tiny model with its initial weights: it loads and answers, badly."""
    import keras

    from convstack.trainer.export import export_version

    keras.utils.set_random_seed(7)
    root = helpers.exported_version().parent.parent / "untrained"
    result = export_version(
        export_helpers.build_tiny_model(),
        **export_helpers.export_kwargs(root, model_name=MODEL, version=1),
    )
    return result.path


def golden_set() -> GoldenSet:
    images, labels = export_helpers.held_out_data()
    return GoldenSet(images, labels, "synthetic held-out squares")


@dataclass
class Replicas:
    """Two server replicas polling one models.config, and the model's directory."""

    servers: list[ServerProcess]
    config_path: Path
    model_dir: Path

    @property
    def targets(self) -> list[str]:
        return [server.grpc_target for server in self.servers]

    def rollout(self, **settings) -> Rollout:
        return make_rollout(self, **settings)

    def add_version(self, version: int, source: Path | None = None) -> Path:
        return shutil.copytree(source or helpers.exported_version(), self.model_dir / str(version))


# These tests are about the rollout's steps, not about latency (tests/serving/rollout/test_gates.py
# covers that gate's decisions): a generous slack keeps a busy CI machine from failing them.
TEST_LATENCY_SLACK_MS = 50.0


def make_rollout(replicas: Replicas, cls=Rollout, **gates) -> Rollout:
    gates.setdefault("latency_slack_ms", TEST_LATENCY_SLACK_MS)
    settings = RolloutSettings(
        wait_timeout=WAIT_SECONDS, sandbox_backend="embedded", gates=GateSettings(**gates)
    )
    store = FileStore(replicas.config_path)
    return cls(MODEL, store, replicas.targets, lambda _: golden_set(), settings=settings)


@pytest.fixture
def replicas(tmp_path) -> Iterator[Replicas]:
    """Versions 1 and 2 on disk, served by `latest` at first, on two replicas."""
    yield from start_replicas(tmp_path)


def start_replicas(tmp_path: Path) -> Iterator[Replicas]:
    """The `replicas` fixture's body, for other rollout test modules."""
    model_dir = helpers.make_model_dir(tmp_path / "models", versions=(1, 2))
    config_path = tmp_path / "models.config"
    model_config.write_model_config(config_path, helpers.config_for(model_dir))
    servers = [
        ServerProcess.start_with_config(config_path, tmp_path / f"replica{i}.log", SERVER_FLAGS)
        for i in range(2)
    ]
    try:
        for server in servers:
            server.wait_available(MODEL)
        yield Replicas(servers, config_path, model_dir)
    finally:
        for server in servers:
            server.stop()


def stable_first(replicas: Replicas, version: int = 1) -> Rollout:
    rollout = replicas.rollout()
    assert rollout.canary(version).ok
    return rollout


def served_version(target: str, label: str) -> int:
    with PredictionClient(target, MODEL, version_label=label) as client:
        return client.predict(golden_set().images[:1]).version


def labels_in_file(replicas: Replicas) -> dict[str, int]:
    config = model_config.load_model_config(replicas.config_path)
    return dict(config.model_config_list.config[0].version_labels)


# --- the verbs ----------------------------------------------------------------------------


def test_first_rollout_canary_promote_and_rollback_on_every_replica(replicas):
    rollout = replicas.rollout()

    first = rollout.canary(1)
    assert first.ok and first.action == "first-rollout"
    assert first.after == ModelState(frozenset({1}), {"stable": 1})
    assert [served_version(t, "stable") for t in replicas.targets] == [1, 1]

    canary = rollout.canary(2)
    assert canary.ok, canary.detail
    assert [gate.name for gate in canary.gates] == ["infra", "quality", "latency"]
    assert labels_in_file(replicas) == {"stable": 1, "canary": 2}
    assert [served_version(t, "canary") for t in replicas.targets] == [2, 2]

    promoted = rollout.promote()
    assert promoted.after == ModelState(frozenset({1, 2}), {"stable": 2, "previous": 1})
    assert [served_version(t, "stable") for t in replicas.targets] == [2, 2]

    rolled_back = rollout.rollback()
    assert rolled_back.after == ModelState(frozenset({1}), {"stable": 1})
    for server in replicas.servers:
        with PredictionClient(server.grpc_target, MODEL) as client:
            states = {s["version"]: s["state"] for s in client.status()}
        assert states == {1: "AVAILABLE", 2: "END"}

    history = verb_records(read_history(replicas.model_dir))
    assert [r["action"] for r in history] == ["first-rollout", "canary", "promote", "rollback"]
    assert all(r["outcome"] == "ok" for r in history)
    assert history[1]["from"]["labels"] == {"stable": 1}
    assert history[1]["to"]["labels"] == {"canary": 2, "stable": 1}
    assert {g["gate"] for g in history[1]["gates"]} == {"infra", "quality", "latency"}


def test_rollback_to_a_named_version_loads_it_first(replicas):
    replicas.add_version(3)
    rollout = stable_first(replicas, 3)
    outcome = rollout.rollback(to=1)
    assert outcome.after == ModelState(frozenset({1}), {"stable": 1})
    assert [served_version(t, "stable") for t in replicas.targets] == [1, 1]


def test_a_failing_quality_gate_rolls_the_canary_back_on_its_own(replicas):
    rollout = stable_first(replicas)
    replicas.add_version(3, source=untrained_version())

    outcome = rollout.run(3)

    assert not outcome.ok
    quality = next(gate for gate in outcome.gates if gate.name == "quality")
    assert not quality.passed
    assert quality.figures["candidate_accuracy"] < quality.figures["required_accuracy"]
    assert outcome.after == ModelState(frozenset({1}), {"stable": 1})
    assert labels_in_file(replicas) == {"stable": 1}
    assert [served_version(t, "stable") for t in replicas.targets] == [1, 1]
    last = read_history(replicas.model_dir)[-1]
    assert last["outcome"] == "failed" and "quality" in last["detail"]


def test_the_accuracy_floor_stops_a_first_rollout(replicas):
    replicas.add_version(3, source=untrained_version())
    rollout = replicas.rollout(accuracy_floor=0.9)
    outcome = rollout.canary(3)
    assert not outcome.ok
    assert outcome.after == outcome.before
    assert labels_in_file(replicas) == {}


def test_a_corrupt_version_fails_infra_validation_and_nothing_changes(replicas):
    rollout = stable_first(replicas)
    helpers.add_corrupt_version(replicas.model_dir, 3)
    text_before = replicas.config_path.read_text()

    outcome = rollout.canary(3)

    assert not outcome.ok
    assert outcome.gates[0].name == "infra" and not outcome.gates[0].passed
    assert "did not load" in outcome.gates[0].summary
    assert replicas.config_path.read_text() == text_before


class CorruptedAfterValidation(Rollout):
    """The candidate passes the sandbox, then its files go bad before the replicas load it
    (a disk fault, a bad sync): the live load fails."""

    def infra_check(self, candidate, golden):
        result = super().infra_check(candidate, golden)
        (candidate.path / "saved_model.pb").write_bytes(b"\x00 not a SavedModel")
        return result


def test_a_version_failing_to_load_on_the_replicas_stops_the_rollout_and_keeps_stable(replicas):
    stable_first(replicas)
    replicas.add_version(3)
    rollout = make_rollout(replicas, cls=CorruptedAfterValidation)

    with pytest.raises(RolloutError, match="version 3 of 'tiny' failed to load"):
        rollout.canary(3)

    assert labels_in_file(replicas) == {"stable": 1}
    assert rollout.state() == ModelState(frozenset({1}), {"stable": 1})
    assert [served_version(t, "stable") for t in replicas.targets] == [1, 1]
    assert read_history(replicas.model_dir)[-1]["outcome"] == "failed"


# --- concurrency ----------------------------------------------------------------------------


def test_edits_to_other_models_racing_the_rollout_are_kept(replicas):
    rollout = stable_first(replicas)
    store = FileStore(replicas.config_path)
    update_config(
        store, lambda c: model_config.add_model(c, "other", replicas.model_dir, specific=[1])
    )
    # Labels may only point at versions a server has loaded (TF Serving's rule).
    wait_for_state(replicas.targets, "other", ModelState(frozenset({1})), WAIT_SECONDS)
    stop = threading.Event()
    edits = []

    def relabel_other():
        while not stop.is_set():
            number = len(edits) + 1
            update_config(
                store, lambda c, n=number: model_config.set_version_labels(c, "other", {f"l{n}": 1})
            )
            edits.append(number)
            stop.wait(0.02)  # a busy but human-scale editor: 50 edits a second

    editor = threading.Thread(target=relabel_other)
    editor.start()
    try:
        assert rollout.canary(2).ok
        assert rollout.promote().ok
    finally:
        stop.set()
        editor.join()

    config = model_config.load_model_config(replicas.config_path)
    models = {m.name: m for m in config.model_config_list.config}
    assert dict(models["tiny"].version_labels) == {"stable": 2, "previous": 1}
    assert dict(models["other"].version_labels) == {f"l{edits[-1]}": 1}
    assert len(edits) > 1


class HandEditDuringRollout(Rollout):
    """Someone relabels the model by hand while the rollout waits for its first step."""

    def _wait(self, state):
        views = super()._wait(state)
        if not getattr(self, "edited", False):
            self.edited = True
            update_config(
                self.store,
                lambda c: model_config.set_version_labels(c, MODEL, {"stable": 1, "hand": 1}),
            )
        return views


def test_a_concurrent_change_to_the_model_stops_the_rollout_without_overwriting_it(replicas):
    stable_first(replicas)
    rollout = make_rollout(replicas, cls=HandEditDuringRollout)

    with pytest.raises(ConcurrentChangeError, match="changed during the rollout"):
        rollout.canary(2)

    assert labels_in_file(replicas) == {"stable": 1, "hand": 1}


# --- under load -----------------------------------------------------------------------------


class StableTraffic:
    """A client thread sending continuous Predict calls to `stable` over both replicas."""

    def __init__(self, targets: list[str]) -> None:
        self.calls = 0
        self.failures: list[str] = []
        self.versions: set[int] = set()
        self._stop = threading.Event()
        self._targets = targets
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        image = golden_set().images[:1]
        clients = [
            PredictionClient(t, MODEL, version_label="stable", retries=0) for t in self._targets
        ]
        try:
            while not self._stop.is_set():
                client = clients[self.calls % len(clients)]
                self.calls += 1
                try:
                    self.versions.add(client.predict(image).version)
                except PredictionError as error:
                    self.failures.append(f"{client.target}: {error}")
        finally:
            for client in clients:
                client.close()

    def __enter__(self) -> StableTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def test_no_call_to_stable_fails_during_canary_promote_and_rollback(replicas, record_property):
    rollout = stable_first(replicas)

    with StableTraffic(replicas.targets) as traffic:
        assert rollout.canary(2).ok
        assert rollout.promote().ok
        assert rollout.rollback().ok

    record_property("calls_during_rollout", traffic.calls)
    record_property("failed_calls", len(traffic.failures))
    print(f"rollout under load: {traffic.calls} calls to stable, {len(traffic.failures)} failed")
    assert traffic.failures == []
    assert traffic.versions == {1, 2}
    assert traffic.calls > 100


# --- the command line -----------------------------------------------------------------------


def rollout_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "convstack.cli", "rollout", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def golden_npz(path: Path) -> str:
    images, labels = export_helpers.held_out_data()
    np.savez(path, x_train=images, y_train=labels, x_test=images, y_test=labels)
    return f"npz:{path}"


def test_the_command_line_runs_a_rollout_and_reports_status(replicas, tmp_path):
    common = ["--model", MODEL, "--store", f"file:{replicas.config_path}",
              "--servers", ",".join(replicas.targets)]  # fmt: skip
    golden = ["--golden", golden_npz(tmp_path / "golden.npz"), "--sandbox-backend", "embedded",
              "--latency-slack-ms", str(TEST_LATENCY_SLACK_MS)]  # fmt: skip

    first = rollout_cli("run", "1", *common, *golden)
    assert first.returncode == 0, first.stderr
    assert "gate infra    PASS" in first.stdout
    second = rollout_cli("run", "2", *common, *golden)
    assert second.returncode == 0, second.stderr
    assert "gate quality  PASS" in second.stdout and "gate latency  PASS" in second.stdout

    status = rollout_cli("status", *common, "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["labels"] == {"previous": 1, "stable": 2}
    assert [s["labels"] for s in report["servers"]] == [{"previous": 1, "stable": 2}] * 2
    assert [v["version"] for v in report["versions"]] == [1, 2]

    table = rollout_cli("status", *common)
    assert "stable" in table.stdout and "VERSION" in table.stdout


def test_the_command_line_refuses_bad_input_in_one_line(replicas):
    common = ["--model", MODEL, "--store", f"file:{replicas.config_path}",
              "--servers", ",".join(replicas.targets)]  # fmt: skip
    promote = rollout_cli("promote", *common)
    assert promote.returncode == 2
    assert promote.stderr.strip().splitlines()[-1] == (
        "convstack rollout promote: there is no canary to promote"
    )
    missing = rollout_cli("canary", "9", *common)
    assert missing.returncode == 2
    assert "there is no version 9" in missing.stderr.strip().splitlines()[-1]
    store = rollout_cli("status", "--model", MODEL, "--store", "s3:bucket")
    assert store.returncode == 2
    assert "not a config store" in store.stderr.strip().splitlines()[-1]


def test_retire_deletes_only_unlabelled_old_versions_and_only_with_yes(replicas):
    for version in (3, 4, 5):
        replicas.add_version(version)
    stable_first(replicas, 1)
    common = ["--model", MODEL, "--store", f"file:{replicas.config_path}"]

    dry = rollout_cli("retire", "--keep", "2", *common)
    assert dry.returncode == 0, dry.stderr
    assert "would delete version 2" in dry.stdout and "would delete version 3" in dry.stdout
    assert sorted(p.name for p in replicas.model_dir.iterdir() if p.name.isdigit()) == [
        "1", "2", "3", "4", "5",
    ]  # fmt: skip

    done = rollout_cli("retire", "--keep", "2", "--yes", *common)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in replicas.model_dir.iterdir() if p.name.isdigit()) == [
        "1", "4", "5",
    ]  # fmt: skip
    assert read_history(replicas.model_dir)[-1]["action"] == "retire"
