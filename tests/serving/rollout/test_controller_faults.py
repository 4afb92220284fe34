"""Rollouts under faults that need no real server (issue #20): a replica that does not answer
before anything is written, a rerun of a rollout that reached its goal or stopped after its
label step, the history records of each config write, and a config that does not parse.

Replicas here are the scripted stand-ins of helpers.py (real gRPC servers on loopback) and free
loopback ports where nothing listens; versions are empty numeric directories, which the
rollout's plan reads without loading them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from convstack.common.ports import free_ports
from convstack.serving import model_config
from convstack.serving.rollout import broken_config
from convstack.serving.rollout.cli import rollout_main
from convstack.serving.rollout.controller import Rollout, RolloutError, RolloutSettings
from convstack.serving.rollout.gates import GoldenSet
from convstack.serving.rollout.history import (
    append_record,
    interrupted_write,
    make_record,
    read_history,
    verb_records,
)
from convstack.serving.rollout.plan import ModelState
from convstack.serving.rollout.store import ConfigStoreError, FileStore
from convstack.serving.rollout.watch import ReplicaUnreachableError, check_reachable
from tests.serving.rollout.helpers import ReplicaScript, stand_in_replica

MODEL = "digits"


def no_golden(_uri):
    """A golden factory whose loader fails the test: these rollouts must not reach a gate."""

    def loader(version):
        pytest.fail(f"a gate ran (golden set of version {version.version} loaded)")

    return loader


class Setup:
    """A model directory with versions on disk and a models.config serving `state`."""

    def __init__(self, root: Path, state: ModelState, on_disk=(1, 2)) -> None:
        self.model_dir = root / MODEL
        for version in on_disk:
            (self.model_dir / str(version)).mkdir(parents=True)
        self.config_path = root / "models.config"
        config = model_config.add_model(
            model_config.ModelServerConfig(),
            MODEL,
            self.model_dir,
            specific=sorted(state.versions),
            labels=dict(state.labels),
        )
        model_config.write_model_config(self.config_path, config)

    def cli(self, *args: str, servers: list[str]) -> int:
        common = ["--model", MODEL, "--store", f"file:{self.config_path}", "--wait-timeout", "30"]
        return rollout_main([*args, *common, "--servers", ",".join(servers)], no_golden)

    def history(self) -> list[dict]:
        return read_history(self.model_dir)


def script_for(state: ModelState) -> ReplicaScript:
    """A stand-in replica that already serves `state`."""
    return ReplicaScript({v: ("AVAILABLE", "") for v in state.versions}, dict(state.labels))


@contextlib.contextmanager
def replica_serving(state: ModelState) -> Iterator[str]:
    with stand_in_replica(script_for(state)) as target:
        yield target


def dead_target() -> str:
    (port,) = free_ports(1)
    return f"127.0.0.1:{port}"


STABLE_1 = ModelState(frozenset({1}), {"stable": 1})
PROMOTED = ModelState(frozenset({1, 2}), {"stable": 2, "previous": 1})


# --- (4) every server answers before anything is written ---------------------------------


@pytest.mark.parametrize(
    ("verb", "state"),
    [(["run", "2"], STABLE_1), (["canary", "2"], STABLE_1), (["rollback"], PROMOTED)],
    ids=["run", "canary", "rollback"],
)
def test_a_replica_down_before_the_start_is_refused_in_one_line_and_nothing_written(
    tmp_path, capsys, verb, state
):
    setup = Setup(tmp_path, state)
    text_before = setup.config_path.read_text()
    dead = dead_target()

    with replica_serving(state) as live:
        code = setup.cli(*verb, servers=[live, dead])

    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"convstack rollout {verb[0]}: replica {dead} unreachable (")
    assert live not in err[0]
    assert setup.config_path.read_text() == text_before
    history = setup.history()
    assert [r["outcome"] for r in history] == ["failed"]  # no step record: nothing written
    assert f"replica {dead} unreachable" in history[0]["detail"]


def test_promote_refuses_with_every_unreachable_replica_named(tmp_path, capsys):
    setup = Setup(tmp_path, ModelState(frozenset({1, 2}), {"stable": 1, "canary": 2}))
    text_before = setup.config_path.read_text()
    first, second = dead_target(), dead_target()

    assert setup.cli("promote", servers=[first, second]) == 1

    line = capsys.readouterr().err.strip()
    assert f"replica {first} unreachable" in line and f"replica {second} unreachable" in line
    assert setup.config_path.read_text() == text_before


# --- (2) a rerun is idempotent -----------------------------------------------------------


def test_a_rerun_of_a_rollout_that_reached_its_goal_has_nothing_to_do(tmp_path, capsys):
    setup = Setup(tmp_path, PROMOTED)
    text_before = setup.config_path.read_text()

    with replica_serving(PROMOTED) as live:
        code = setup.cli("run", "2", servers=[live])

    assert code == 0
    out = capsys.readouterr().out
    assert "version 2 is already stable: nothing to do" in out
    assert setup.config_path.read_text() == text_before
    assert setup.history() == []


def test_a_rerun_records_the_outcome_of_the_write_a_killed_rollout_left_open(tmp_path, capsys):
    setup = Setup(tmp_path, PROMOTED)
    canary = ModelState(frozenset({1, 2}), {"stable": 1, "canary": 2})
    intent = make_record(
        model=MODEL,
        action="promote",
        step="label",
        outcome="intent",
        store="file:x",
        before=canary.as_record(),
        after=PROMOTED.as_record(),
    )
    append_record(setup.model_dir, intent)

    with replica_serving(PROMOTED) as live:
        assert setup.cli("run", "2", servers=[live]) == 0

    assert "the last rollout stopped at its promote.label write" in capsys.readouterr().out
    opened, closed = setup.history()
    assert opened == intent
    assert (closed["action"], closed["step"], closed["outcome"]) == ("promote", "label", "written")
    assert (closed["from"], closed["to"]) == (intent["from"], intent["to"])
    assert interrupted_write(setup.history(), MODEL) is None


class HistoryAtWrite(FileStore):
    """A file store noting the history's last record at each config write."""

    def __init__(self, path, model_dir: Path) -> None:
        super().__init__(path)
        self.model_dir = model_dir
        self.last_record_at_write: list[dict] = []

    def write(self, config, expected_revision, before_replace=None):
        self.last_record_at_write.append(read_history(self.model_dir)[-1])
        return super().write(config, expected_revision, before_replace)


def test_a_rerun_stopped_after_the_promote_label_finishes_the_unload(tmp_path):
    # Killed after promote's label step: version 1, the old previous, is still listed.
    stopped = ModelState(frozenset({1, 2, 3}), {"stable": 3, "previous": 2})
    goal = ModelState(frozenset({2, 3}), {"stable": 3, "previous": 2})
    setup = Setup(tmp_path, stopped, on_disk=(1, 2, 3))
    store = HistoryAtWrite(setup.config_path, setup.model_dir)

    with replica_serving(goal) as live:
        outcome = Rollout(MODEL, store, [live], no_golden(None)).run(3)

    assert outcome.ok and outcome.after == goal
    assert "finished its unload step" in outcome.detail
    policy = model_config.load_model_config(setup.config_path).model_config_list.config[0]
    assert list(policy.model_version_policy.specific.versions) == [2, 3]
    # (1) the write's intent was in the history before the config changed, its outcome after.
    [at_write] = store.last_record_at_write
    assert (at_write["step"], at_write["outcome"]) == ("unload", "intent")
    steps = [(r["action"], r["step"], r["outcome"]) for r in setup.history() if "step" in r]
    assert steps == [("run", "unload", "intent"), ("run", "unload", "written")]
    assert [(r["action"], r["outcome"]) for r in verb_records(setup.history())] == [("run", "ok")]


class RefusingStore(FileStore):
    """A file store whose every write fails (a full disk, a read-only volume)."""

    def write(self, config, expected_revision, before_replace=None):
        raise ConfigStoreError(f"{self.uri}: cannot write: scripted failure")


def test_a_write_the_store_refuses_is_recorded_as_not_written(tmp_path):
    stopped = ModelState(frozenset({1, 2, 3}), {"stable": 3, "previous": 2})
    setup = Setup(tmp_path, stopped, on_disk=(1, 2, 3))
    store = RefusingStore(setup.config_path)
    settings = RolloutSettings(wait_timeout=5.0)

    with replica_serving(stopped) as live, pytest.raises(ConfigStoreError, match="cannot write"):
        Rollout(MODEL, store, [live], no_golden(None), settings=settings).run(3)

    outcomes = [(r.get("step"), r["outcome"]) for r in setup.history()]
    assert outcomes == [("unload", "intent"), ("unload", "not-written"), (None, "failed")]


# --- (5) a config that does not parse still gets a failure record ------------------------


def test_an_unreadable_config_fails_in_one_line_and_is_recorded(tmp_path, capsys):
    setup = Setup(tmp_path, STABLE_1)
    broken = setup.config_path.read_text().replace("}", "", 1) + "\nnot a field\n"
    setup.config_path.write_text(broken)

    with replica_serving(STABLE_1) as live:
        code = setup.cli("run", "2", servers=[live])

    assert code == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"convstack rollout run: file:{setup.config_path}")
    [record] = setup.history()
    assert (record["action"], record["outcome"]) == ("run", "failed")
    assert record["detail"] == line.removeprefix("convstack rollout run: ")
    assert setup.config_path.read_text() == broken


def test_the_base_path_is_found_in_text_that_does_not_parse():
    text = """model_config_list {
      config { name: "other" base_path: "/m/other" }
      config {
        name: 'digits'
        base_path: "/m/dig\\"its"  # a comment
        model_version_policy { specific { versions: 1 }
    """
    assert broken_config.base_path_in_text(text, "digits") == Path('/m/dig"its')
    assert broken_config.base_path_in_text(text, "other") == Path("/m/other")
    assert broken_config.base_path_in_text(text, "absent") is None
    assert broken_config.base_path_in_text("garbage", "digits") is None


# --- (3) calls a dead replica did not answer are not held against the candidate ----------


def test_golden_traffic_failing_on_an_unreachable_replica_gives_no_verdict(tmp_path):
    state = ModelState(frozenset({1, 2}), {"stable": 1, "canary": 2})
    setup = Setup(tmp_path, state)
    golden = GoldenSet(np.zeros((4, 28, 28, 1), np.float32), np.zeros(4, np.int64), "zeros")
    dead = dead_target()

    with replica_serving(state) as live:
        rollout = Rollout(MODEL, FileStore(setup.config_path), [live, dead], no_golden(None))
        with pytest.raises(ReplicaUnreachableError, match=f"^replica {dead} unreachable") as error:
            rollout.live_gates(golden)

    assert error.value.targets == [dead]
    assert live not in str(error.value)


class ReplicaDiesAfterTheCheck(Rollout):
    """The servers' check passes, then a replica stops answering before a step is served."""

    def _preflight(self):
        check_reachable(self.servers[:1], self.model)


def test_a_replica_silent_during_a_step_stops_the_rollout_at_that_step(tmp_path):
    stopped = ModelState(frozenset({1, 2, 3}), {"stable": 3, "previous": 2})
    goal = ModelState(frozenset({2, 3}), {"stable": 3, "previous": 2})
    setup = Setup(tmp_path, stopped, on_disk=(1, 2, 3))
    dead = dead_target()
    # A wait long enough that only the unreachable rule can end it in time.
    settings = RolloutSettings(wait_timeout=60.0, unreachable_seconds=1.0)

    with replica_serving(goal) as live:
        rollout = ReplicaDiesAfterTheCheck(
            MODEL, FileStore(setup.config_path), [live, dead], no_golden(None), settings=settings
        )
        with pytest.raises(RolloutError, match=f"^replica {dead} unreachable for") as error:
            rollout.run(3)

    assert "stopped with the config at the unload step" in str(error.value)
    assert live not in str(error.value)
    last = setup.history()[-1]
    assert (last["action"], last["outcome"]) == ("run", "failed")
    assert f"replica {dead} unreachable" in last["detail"]
