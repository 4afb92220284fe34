"""Rollouts under faults on two real embedded replicas (issue #20): `convstack rollout run`
SIGKILLed at its config writes and rerun (then a broken hand edit of the config, and the stable
version's directory removed), and a replica killed during the canary's observation and then
down before the next verb starts. A client calls `stable` on the live replicas throughout; none
of its calls may fail.

The kills use the rollout's crash points (serving/rollout/crash_points.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from convstack.serving import model_config
from convstack.serving.rollout import crash_points
from convstack.serving.rollout import plan as rollout_plan
from convstack.serving.rollout.controller import RolloutError
from convstack.serving.rollout.history import read_history
from convstack.serving.rollout.plan import ModelState
from convstack.serving.rollout.store import FileStore, update_config
from convstack.serving.rollout.watch import ReplicaUnreachableError, wait_for_state
from tests.serving.rollout import test_e2e as e2e

pytestmark = pytest.mark.slow


@pytest.fixture
def replicas(tmp_path) -> Iterator[e2e.Replicas]:
    """Two embedded replicas polling one models.config (test_e2e's fixture)."""
    yield from e2e.start_replicas(tmp_path)


MODEL = e2e.MODEL
STABLE_1 = ModelState(frozenset({1}), {"stable": 1})
PROMOTED = ModelState(frozenset({1, 2}), {"stable": 2, "previous": 1})
# Each config write of `run 2` from STABLE_1 (canary: load, label; promote: label), killed
# after it; and one kill between a write's intent record and the write.
KILLS = [
    crash_points.config_written("canary.load"),
    crash_points.config_written("canary.label"),
    crash_points.config_written("promote.label"),
    crash_points.intent_recorded("canary.label"),
]
GOAL_WRITTEN = crash_points.config_written("promote.label")


def rollout_cli(*args: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != crash_points.ENV}
    if crash_at is not None:
        env[crash_points.ENV] = crash_at
    command = [sys.executable, "-m", "convstack.cli", "rollout", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False, env=env
    )


def state_in_file(replicas) -> ModelState:
    config = model_config.load_model_config(replicas.config_path)
    model = config.model_config_list.config[0]
    return ModelState(
        frozenset(model.model_version_policy.specific.versions), dict(model.version_labels)
    )


def move_to(replicas, target: ModelState) -> None:
    """Take the model to `target` in TF Serving's safe order, as a rollout would."""
    store = FileStore(replicas.config_path)
    for step in rollout_plan.steps_to(state_in_file(replicas), target.labels):
        update_config(store, lambda c, s=step: rollout_plan.apply_state(c, MODEL, s.state))
        wait_for_state(replicas.targets, MODEL, step.state, e2e.WAIT_SECONDS)


def check_step_records(records: list[dict]) -> None:
    """Every write's outcome follows its intent, and every intent has an outcome."""
    open_intents: list[tuple[str, str]] = []
    for record in records:
        if "step" not in record:
            continue
        key = (record["action"], record["step"])
        if record["outcome"] == "intent":
            open_intents.append(key)
        else:
            assert open_intents and open_intents[-1] == key, records
            open_intents.pop()
    assert not open_intents, records


def test_a_rollout_killed_at_each_config_write_is_finished_by_its_rerun(replicas, tmp_path):
    e2e.stable_first(replicas)
    common = ["--model", MODEL, "--store", f"file:{replicas.config_path}",
              "--servers", ",".join(replicas.targets)]  # fmt: skip
    golden = ["--golden", e2e.golden_npz(tmp_path / "golden.npz"), "--sandbox-backend",
              "embedded", "--latency-slack-ms", str(e2e.TEST_LATENCY_SLACK_MS)]  # fmt: skip

    with e2e.StableTraffic(replicas.targets) as traffic:
        for point in KILLS:
            move_to(replicas, STABLE_1)
            start = len(read_history(replicas.model_dir))

            killed = rollout_cli("run", "2", *common, *golden, crash_at=point)

            assert killed.returncode == -9, (point, killed.stdout, killed.stderr)
            killed_records = read_history(replicas.model_dir)[start:]
            last = killed_records[-1]
            action, step = point.split("@", 1)[1].split(".")
            # The write the kill interrupted has its record, whichever side of it the kill hit.
            assert (last["action"], last["step"], last["outcome"]) == (action, step, "intent")
            written = point.startswith("config-written@")
            shown = ModelState(frozenset(last["to" if written else "from"]["versions"]),
                               last["to" if written else "from"]["labels"])  # fmt: skip
            assert state_in_file(replicas) == shown, point

            rerun = rollout_cli("run", "2", *common, *golden)

            assert rerun.returncode == 0, (point, rerun.stdout, rerun.stderr)
            assert state_in_file(replicas) == PROMOTED, point
            rerun_records = read_history(replicas.model_dir)[start + len(killed_records) :]
            # The rerun first gives the interrupted write the outcome the config shows.
            closed = rerun_records[0]
            assert (closed["action"], closed["step"]) == (action, step)
            assert closed["outcome"] == ("written" if written else "not-written"), closed
            assert closed["detail"].startswith("found after an interrupted rollout")
            check_step_records(killed_records + rerun_records)  # every write has its outcome
            if point == GOAL_WRITTEN:  # the kill came after the last write: nothing is left
                assert "nothing to do" in rerun.stdout and rerun_records == [closed]
            else:
                assert rerun_records[-1]["outcome"] == "ok", rerun_records[-1]

        again = rollout_cli("run", "2", *common, *golden)
        # A broken hand edit: the replicas keep their last good config; the run is recorded.
        good = replicas.config_path.read_text()
        replicas.config_path.write_text(good.replace("}", "", 1) + "\nnot a field\n")
        broken = rollout_cli("run", "2", *common, *golden)
        replicas.config_path.write_text(good)

    assert again.returncode == 0, again.stderr
    assert "version 2 is already stable: nothing to do" in again.stdout
    assert broken.returncode == 1, broken.stdout
    assert (
        broken.stderr.strip()
        .splitlines()[-1]
        .startswith(f"convstack rollout run: file:{replicas.config_path}")
    )
    last = read_history(replicas.model_dir)[-1]
    assert (last["action"], last["outcome"]) == ("run", "failed")
    # The stable version's directory removed by hand: status says what a restart would lose.
    shutil.rmtree(replicas.model_dir / "2")
    status = rollout_cli("status", *common)
    assert "warning: stable version 2 is missing on disk; a replica restart will lose it" in (
        status.stdout
    )
    print(f"kills at {len(KILLS)} writes: {traffic.calls} calls to stable, "
          f"{len(traffic.failures)} failed")  # fmt: skip
    assert traffic.failures == []
    assert traffic.calls > 100


class ReplicaDiesDuringObservation(e2e.Rollout):
    """Kills the second replica when the observation of the canary starts."""

    def live_gates(self, golden):
        self.gate_rounds = getattr(self, "gate_rounds", 0) + 1
        if self.gate_rounds == 2:  # the first is the canary's own; then observation
            victim = self.victim
            victim.process.kill()
            victim.process.wait()
        return super().live_gates(golden)


def test_a_dead_replica_is_an_infrastructure_fault_not_the_candidates(replicas):
    e2e.stable_first(replicas)
    # A wide latency slack: the client hammering stable shares the machine with the gates.
    rollout = e2e.make_rollout(replicas, cls=ReplicaDiesDuringObservation, latency_slack_ms=1e3)
    rollout.settings.observe_seconds = 600.0  # never reached: the replica dies first
    live, dead = replicas.targets
    rollout.victim = replicas.servers[1]

    with e2e.StableTraffic([live]) as traffic:
        try:
            outcome = rollout.run(2)
        except RolloutError as error:
            stopped = error
        else:
            gates = [gate.line() for gate in outcome.gates]
            pytest.fail(f"run 2 did not stop: {outcome.detail}; {gates}")
        at_canary = replicas.config_path.read_text()
        # Down before the next verb starts: refused, nothing written.
        with pytest.raises(ReplicaUnreachableError, match=f"^replica {dead} unreachable"):
            rollout.rollback()
        with pytest.raises(ReplicaUnreachableError, match=f"^replica {dead} unreachable"):
            rollout.run(2)

    message = str(stopped)
    assert "not counted against version 2" in message and "canary step" in message
    assert "quality" not in message
    assert e2e.labels_in_file(replicas) == {"stable": 1, "canary": 2}
    assert replicas.config_path.read_text() == at_canary
    history = read_history(replicas.model_dir)
    failed = [r for r in history if r["outcome"] == "failed"]
    assert [r["action"] for r in failed] == ["run", "rollback", "run"]
    assert all(f"replica {dead} unreachable" in r["detail"] for r in failed)
    assert not any(g["gate"] == "quality" and not g["passed"] for r in history for g in r["gates"])
    print(
        f"replica killed: {traffic.calls} calls to stable on {live}, {len(traffic.failures)} failed"
    )
    assert traffic.failures == []
    assert traffic.calls > 10
