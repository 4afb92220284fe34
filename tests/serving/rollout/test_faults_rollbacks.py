"""Rollouts under faults, the other writers (issue #20): the automatic rollback after a failed
gate, and the standalone `rollout promote` and `rollout rollback`, each SIGKILLed at every one
of its config writes on two real embedded replicas and rerun. A rerun finishes what the killed
command left: promote and rollback exit 0 at their goal; a run whose gates rejected the
candidate finishes the rollback and keeps its verdict (exit 1, as had it not been killed),
without trying the candidate again. A client calls `stable` throughout; none of its calls may
fail. Apart from test_faults.py so that pytest-xdist's two workers share the rollout kills.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from convstack.serving.rollout import crash_points
from convstack.serving.rollout.history import read_history
from convstack.serving.rollout.plan import ModelState
from tests.serving.rollout import test_e2e as e2e
from tests.serving.rollout import test_faults as faults

pytestmark = pytest.mark.slow

STABLE_1 = faults.STABLE_1
PROMOTED = faults.PROMOTED
# Version 3 (untrained) the canary next to stable 2 and previous 1: its promote has two
# writes, the label and the unload of the old previous.
CANARY_3 = ModelState(frozenset({1, 2, 3}), {"stable": 2, "previous": 1, "canary": 3})
PROMOTED_3 = ModelState(frozenset({2, 3}), {"stable": 3, "previous": 2})
EXIT_FAILED = 1


@pytest.fixture
def replicas(tmp_path) -> Iterator[e2e.Replicas]:
    yield from e2e.start_replicas(tmp_path)


# (command, the state it starts from, where it is killed, the state its rerun ends at, the
# rerun's exit status, what the rerun says)
CASES = [
    *[(["run", "3"], STABLE_1, point, STABLE_1, EXIT_FAILED,
       "version 3 was rolled back: its gates failed in the interrupted run")
      for point in (crash_points.config_written("auto-rollback.label"),
                    crash_points.intent_recorded("auto-rollback.unload"),
                    crash_points.config_written("auto-rollback.unload"))],
    *[(["promote"], CANARY_3, point, PROMOTED_3, 0, "finished the promote")
      for point in (crash_points.config_written("promote.label"),
                    crash_points.intent_recorded("promote.unload"),
                    crash_points.config_written("promote.unload"))],
    *[(["rollback"], PROMOTED, point, STABLE_1, 0, "finished the rollback")
      for point in (crash_points.config_written("rollback.label"),
                    crash_points.config_written("rollback.unload"))],
]  # fmt: skip


def test_rollbacks_and_promotes_killed_at_each_config_write_are_finished_by_their_rerun(
    replicas, tmp_path
):
    e2e.stable_first(replicas)
    replicas.add_version(3, source=e2e.untrained_version())
    common = ["--model", faults.MODEL, "--store", f"file:{replicas.config_path}",
              "--servers", ",".join(replicas.targets)]  # fmt: skip
    golden = ["--golden", e2e.golden_npz(tmp_path / "golden.npz"), "--sandbox-backend",
              "embedded", "--latency-slack-ms", str(e2e.TEST_LATENCY_SLACK_MS)]  # fmt: skip

    with e2e.StableTraffic(replicas.targets) as traffic:
        for command, start_state, point, goal, status, says in CASES:
            faults.move_to(replicas, start_state)
            start = len(read_history(replicas.model_dir))
            args = [*command, *common, *(golden if command[0] == "run" else [])]

            killed = faults.rollout_cli(*args, crash_at=point)

            assert killed.returncode == -9, (point, killed.stdout, killed.stderr)
            killed_records = read_history(replicas.model_dir)[start:]
            last = killed_records[-1]
            action, step = point.split("@", 1)[1].split(".")
            assert (last["action"], last["step"], last["outcome"]) == (action, step, "intent")

            rerun = faults.rollout_cli(*args)

            assert rerun.returncode == status, (point, rerun.stdout, rerun.stderr)
            assert says in rerun.stdout, (point, rerun.stdout)
            assert faults.state_in_file(replicas) == goal, point
            rerun_records = read_history(replicas.model_dir)[start + len(killed_records) :]
            written = point.startswith("config-written@")
            closed = rerun_records[0]
            assert (closed["action"], closed["step"]) == (action, step)
            assert closed["outcome"] == ("written" if written else "not-written"), closed
            faults.check_step_records(killed_records + rerun_records)
            # The rerun wrote only what was left: never the candidate's canary again.
            assert not [r for r in rerun_records if r["action"] == "canary"], rerun_records
            assert rerun_records[-1]["outcome"] == ("ok" if status == 0 else "failed")

    print(f"kills at {len(CASES)} rollback/promote writes: {traffic.calls} calls to stable, "
          f"{len(traffic.failures)} failed")  # fmt: skip
    assert traffic.failures == []
    assert traffic.calls > 100
