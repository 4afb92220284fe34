"""Rollouts of model versions on TF Serving replicas, driven through models.config alone.

`Rollout` runs the verbs of `convstack rollout`: status, canary, promote, rollback, run and
retire. Each verb plans its config steps (serving/rollout/plan.py), writes them one at a time
through a config store with optimistic concurrency (serving/rollout/store.py), waits after each
until every server replica serves it (serving/rollout/watch.py), and records the change with
its gate results in the append-only history next to the versions (serving/rollout/history.py).

Under faults: a verb that writes first checks that every server answers, and refuses with the
config untouched when one does not; each config write has a history record before it (intent)
and after it, so a rollout killed anywhere leaves a record of every write; whatever stops a verb
gets a failed record (a config that does not parse too, in the history its text still names);
a replica that stops answering while the canary is observed stops the rollout at the canary
step without a verdict on the candidate; and a rerun of `run` picks up from the config's state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from convstack.serving.model_config import ModelServerConfig
from convstack.serving.rollout import broken_config, crash_points
from convstack.serving.rollout import plan as rollout_plan
from convstack.serving.rollout.gates import (
    GateResult,
    GateSettings,
    GoldenSet,
    golden_traffic,
    infra_gate,
    latency_gate,
    quality_gate,
)
from convstack.serving.rollout.history import (
    HistoryError,
    append_record,
    interrupted_write,
    make_record,
    read_history,
)
from convstack.serving.rollout.plan import CANARY, STABLE, ModelState, RolloutPlanError, Step
from convstack.serving.rollout.repository import (
    RepositoryError,
    VersionOnDisk,
    delete_version,
    find_version,
    list_versions,
    version_numbers,
    versions_to_retire,
)
from convstack.serving.rollout.store import ConfigStore, ConfigStoreError, update_config
from convstack.serving.rollout.watch import (
    ReplicaUnreachableError,
    ReplicaView,
    WatchError,
    check_reachable,
    expand_targets,
    wait_for_state,
)

log = logging.getLogger(__name__)

GoldenLoader = Callable[[VersionOnDisk], GoldenSet]


class RolloutError(RuntimeError):
    """A rollout that cannot start or finish; one line saying why (nothing half-applied is
    left without saying so)."""


class RolloutUsageError(RolloutError, ValueError):
    """The verb lacks what it needs (servers to watch...); a usage error."""


class ConcurrentChangeError(RolloutError):
    """The model's versions or labels changed under the rollout (another rollout, a hand edit)."""


@dataclass
class Outcome:
    """What a verb did: `ok`, the state before and after, the gates, and a one-line detail."""

    action: str
    ok: bool
    before: ModelState
    after: ModelState
    gates: list[GateResult] = field(default_factory=list)
    detail: str = ""


@dataclass
class Attempt:
    """A verb under way, for its failure record: the state it started from and the gates it
    has run so far (both filled in as the verb learns them)."""

    action: str
    before: ModelState | None = None
    gates: list[GateResult] = field(default_factory=list)
    goal: ModelState | None = None  # where the steps being applied end


# The action of the config writes of a run's (or canary's) rollback after a failed gate.
AUTO_ROLLBACK = "auto-rollback"

# What stops a verb after it started; each gets a failed history record (bad input does not:
# it is refused before anything is tried).
RECORDED_FAILURES = (RolloutError, ConfigStoreError, WatchError)


@dataclass
class RolloutSettings:
    """How a rollout waits and observes (flags of `convstack rollout`)."""

    wait_timeout: float = 300.0
    # A replica silent this long during a step's wait stops the rollout (at that step, which
    # is safe): waiting out wait_timeout for a dead server only delays the same outcome.
    unreachable_seconds: float = 30.0
    observe_seconds: float = 0.0
    sandbox_backend: str = "auto"
    gates: GateSettings = field(default_factory=GateSettings)


class Rollout:
    """The rollout verbs for one model of one config store, watching `servers`."""

    def __init__(
        self,
        model: str,
        store: ConfigStore,
        servers: Sequence[str],
        golden: GoldenLoader,
        *,
        repository: str | Path | None = None,
        settings: RolloutSettings | None = None,
        say: Callable[[str], None] = log.info,
    ) -> None:
        self.model = model
        self.store = store
        self.servers = list(servers)
        self.golden = golden
        self._repository = Path(repository) if repository is not None else None
        self.settings = settings or RolloutSettings()
        self.say = say

    # --- reading ---------------------------------------------------------------------------

    def config(self) -> ModelServerConfig:
        return self.store.read().config

    def repository(self, config: ModelServerConfig | None = None) -> Path:
        """The model's version directories: --model-repository, else the config's base_path."""
        if self._repository is not None:
            return self._repository
        config = config if config is not None else self.config()
        for model in config.model_config_list.config:
            if model.name == self.model:
                return Path(model.base_path)
        raise RolloutUsageError(f"{self.store.uri}: model {self.model!r} is not in the config")

    def disk_versions(self, config: ModelServerConfig | None = None) -> list[VersionOnDisk]:
        return list_versions(self.repository(config))

    def state(self, config: ModelServerConfig | None = None) -> ModelState:
        config = config if config is not None else self.config()
        # Only the numbers: this runs in every config edit, and reading each card is not needed.
        disk = version_numbers(self.repository(config))
        return rollout_plan.model_state(config, self.model, disk)

    # --- writing ---------------------------------------------------------------------------

    def _write(self, step: Step, expected: ModelState, attempt: Attempt) -> None:
        """One config write, recorded in the history before (intent) and after (written, or
        not-written when the store refused it), so that a rollout killed at any point leaves
        a record of every write it made."""
        where = f"{attempt.action}.{step.name}"

        def edit(config: ModelServerConfig) -> ModelServerConfig:
            found = self.state(config)
            if found != expected:
                raise ConcurrentChangeError(
                    f"{self.store.uri}: model {self.model!r} changed during the rollout "
                    f"(expected {expected.as_record()}, found {found.as_record()}); stopped"
                )
            return rollout_plan.apply_state(config, self.model, step.state)

        goal = attempt.goal or step.state
        self._record_step(attempt.action, step, expected, "intent", goal=goal)
        crash_points.reached(crash_points.intent_recorded(where))
        try:
            update_config(self.store, edit)
        except (RolloutError, ConfigStoreError) as error:
            self._record_step(attempt.action, step, expected, "not-written", str(error), goal)
            raise
        crash_points.reached(crash_points.config_written(where))
        self._record_step(attempt.action, step, expected, "written", goal=goal)

    def _record_step(
        self,
        action: str,
        step: Step,
        expected: ModelState,
        outcome: str,
        detail: str = "",
        goal: ModelState | None = None,
    ) -> None:
        """A step record, with the state its verb's steps end at (`goal`, from which a rerun
        finishes a verb that was killed); a HistoryError stops the verb before its write."""
        record = make_record(
            model=self.model,
            action=action,
            step=step.name,
            outcome=outcome,
            store=self.store.uri,
            before=expected.as_record(),
            after=step.state.as_record(),
            detail=detail,
        )
        if goal is not None:
            record["goal"] = goal.as_record()
        append_record(self.repository(), record)

    def _wait(self, state: ModelState) -> list[ReplicaView]:
        return wait_for_state(
            self.servers,
            self.model,
            state,
            self.settings.wait_timeout,
            unreachable_after=self.settings.unreachable_seconds,
        )

    def _apply(self, steps: list[Step], before: ModelState, attempt: Attempt) -> ModelState:
        """Write and wait for each step. A version failing to load (or a load step that times
        out) puts the model back as it was before and raises RolloutError."""
        current = before
        if steps:
            attempt.goal = steps[-1].state
        for step in steps:
            self.say(
                f"  {step.name}: versions {sorted(step.state.versions)}, labels "
                f"{dict(sorted(step.state.labels.items()))}"
            )
            self._write(step, current, attempt)
            try:
                self._wait(step.state)
            except ReplicaUnreachableError as error:
                # No undo: it would wait for the same replica. Every step is a safe state.
                raise RolloutError(
                    f"{error}; stopped with the config at the {step.name} step "
                    f"({describe_state(step.state)}); rerun once every replica answers"
                ) from error
            except WatchError as error:
                if step.name != "load":
                    raise RolloutError(f"{error}; the config is at the {step.name} step") from error
                self._undo_load(step.state, before, attempt)
                raise RolloutError(f"{error}; the load was undone") from error
            current = step.state
        return current

    def _undo_load(self, loaded: ModelState, before: ModelState, attempt: Attempt) -> None:
        self.say(f"  undo: back to versions {sorted(before.versions)}")
        attempt.goal = before
        self._write(Step("unload", before), loaded, attempt)
        self._wait(before)

    @contextlib.contextmanager
    def _attempt(self, action: str) -> Iterator[Attempt]:
        """Run a verb's body; whatever stops it gets one failed record (a nested verb's
        failure is recorded once, by the innermost verb)."""
        attempt = Attempt(action)
        try:
            yield attempt
        except RECORDED_FAILURES as error:
            if not getattr(error, "rollout_recorded", False):
                error.rollout_recorded = True
                self._record_failure(attempt, str(error))
            raise

    def _record_failure(self, attempt: Attempt, detail: str) -> None:
        """Append the failed record of `attempt`; a history that cannot be written is said,
        not raised, so that the error that stopped the verb is the one reported."""
        before = attempt.before.as_record() if attempt.before is not None else {}
        try:
            after = self.state().as_record()
        except (RolloutError, ConfigStoreError, RolloutPlanError, RepositoryError):
            after = {}
        record = make_record(
            model=self.model,
            action=attempt.action,
            outcome="failed",
            store=self.store.uri,
            before=before,
            after=after,
            gates=[gate.as_record() for gate in attempt.gates],
            detail=detail,
        )
        try:
            append_record(self._history_home(), record)
        except (HistoryError, RolloutError, ConfigStoreError, RolloutPlanError) as error:
            self.say(f"warning: the failure was not recorded in the history: {error}")

    def _history_home(self) -> Path:
        """Where the history is: the repository, or, when the config does not parse, the
        base_path its text still names (so a broken hand edit's failure is recorded too)."""
        try:
            return self.repository()
        except ConfigStoreError:
            salvaged = broken_config.salvaged_base_path(self.store, self.model)
            if salvaged is None:
                raise
            return salvaged

    def _close_interrupted(self, state: ModelState) -> None:
        """Give a config write that a killed rollout left without an outcome the outcome the
        config shows now (`state`): written, not-written, or unknown when it moved on since."""
        try:
            intent = interrupted_write(read_history(self.repository()), self.model)
        except HistoryError as error:
            self.say(f"warning: {error}; an interrupted write cannot be looked for")
            return
        if intent is None:
            return
        shown = state.as_record()
        outcome = {_as_json(intent["to"]): "written", _as_json(intent["from"]): "not-written"}
        found = outcome.get(_as_json(shown), "unknown")
        where = f"{intent['action']}.{intent['step']}"
        detail = f"found after an interrupted rollout (intent of {intent['time']}, {intent['who']})"
        self.say(f"the last rollout stopped at its {where} write; the config shows it {found}")
        record = make_record(
            model=self.model,
            action=intent["action"],
            step=intent["step"],
            outcome=found,
            store=self.store.uri,
            before=intent["from"],
            after=intent["to"],
            detail=detail,
        )
        if "goal" in intent:
            record["goal"] = intent["goal"]
        append_record(self.repository(), record)

    def _unfinished(self, actions: tuple[str, ...], state: ModelState) -> tuple[dict, list[Step]]:
        """The last config write of a verb among `actions` that was killed before it finished
        (no verb record after its step records), and the steps from `state` to the goal its
        records name; ({}, []) when there is none. What a rerun of that verb finishes first."""
        try:
            records = [r for r in read_history(self.repository()) if r.get("model") == self.model]
        except HistoryError:
            return {}, []
        last = records[-1] if records else {}
        if "step" not in last or last.get("action") not in actions or "goal" not in last:
            return {}, []
        goal = last["goal"]
        labels = {label: int(v) for label, v in goal["labels"].items()}
        return last, rollout_plan.steps_to(state, labels, keep=goal["versions"])

    def _finish(self, record: dict, steps: list[Step], before: ModelState) -> ModelState:
        """Apply the steps left of the killed `record`'s verb, recorded as that verb's writes
        (a failure on the way is recorded by the verb running now)."""
        self.say(
            f"the last {record['action']} stopped after its {record['step']} write; "
            + (f"finishing its {', '.join(s.name for s in steps)} step(s)" if steps else
               "nothing was left of it")
        )  # fmt: skip
        if not steps:
            return before
        self._preflight()
        return self._apply(steps, before, Attempt(record["action"], before))

    def _preflight(self) -> None:
        """Refuse before writing anything unless every server answers (a replica that is
        down would stall the first wait and leave the config half-done)."""
        check_reachable(self.servers, self.model)

    def _record(self, outcome: Outcome) -> Outcome:
        record = make_record(
            model=self.model,
            action=outcome.action,
            outcome="ok" if outcome.ok else "failed",
            store=self.store.uri,
            before=outcome.before.as_record(),
            after=outcome.after.as_record(),
            gates=[gate.as_record() for gate in outcome.gates],
            detail=outcome.detail,
        )
        append_record(self.repository(), record)
        return outcome

    def _need_servers(self, verb: str) -> None:
        if not self.servers:
            raise RolloutUsageError(f"{verb} needs --servers to watch (HOST:PORT or dns:///)")

    # --- verbs -----------------------------------------------------------------------------

    def canary(self, version: int) -> Outcome:
        """Gates, then `version` loaded next to stable and labelled canary (or made stable
        directly on a first rollout); a failing live gate rolls the canary back."""
        self._need_servers("canary")
        with self._attempt("canary") as attempt:
            return self._canary(version, attempt)

    def _canary(self, version: int, attempt: Attempt) -> Outcome:
        config = self.config()
        before = attempt.before = self.state(config)
        self._close_interrupted(before)
        candidate = find_version(self.repository(config), version)
        # Plan first: a verb that does not apply is refused before any gate runs.
        if before.stable is None:
            attempt.action = "first-rollout"
            steps = rollout_plan.first_rollout(before, version)
        else:
            steps = rollout_plan.canary(before, version)
        self._preflight()
        golden = self.golden(candidate)
        self.say(f"golden set: {len(golden.labels)} examples from {golden.source}")
        infra, sandbox_stats = self.infra_check(candidate, golden)
        attempt.gates = [infra]
        self._say_gate(infra)
        if not infra.passed:
            detail = f"version {version} failed infra validation"
            return self._record(Outcome(attempt.action, False, before, before, [infra], detail))
        if before.stable is None:
            return self._first_rollout(version, before, steps, attempt, sandbox_stats)
        after = self._apply(steps, before, attempt)
        try:
            live = self.live_gates(golden)
        except ReplicaUnreachableError as error:
            raise self._stopped_at_canary(error, after, version) from error
        gates = attempt.gates = [infra, *live]
        if all(gate.passed for gate in gates):
            self.say(f"version {version} is the canary next to stable {after.stable}")
            return self._record(Outcome("canary", True, before, after, gates))
        return self._roll_back_failed(attempt, before, after, gates)

    def infra_check(self, candidate: VersionOnDisk, golden: GoldenSet):
        """The infra gate on `candidate`, and its golden traffic in the sandbox."""
        return infra_gate(
            self.model,
            candidate.path.parent,
            candidate.version,
            golden,
            self.settings.gates,
            self.settings.sandbox_backend,
        )

    def _first_rollout(self, version, before, steps, attempt, sandbox_stats) -> Outcome:
        quality = quality_gate(sandbox_stats, None, self.settings.gates)
        latency = latency_gate(sandbox_stats, None, self.settings.gates)
        for gate in (quality, latency):
            self._say_gate(gate, where="in the sandbox")
        gates = attempt.gates = [*attempt.gates, quality, latency]
        if not quality.passed:
            detail = f"version {version} below the accuracy floor"
            return self._record(Outcome("first-rollout", False, before, before, gates, detail))
        after = self._apply(steps, before, attempt)
        self.say(f"version {version} is stable (first rollout of {self.model!r})")
        return self._record(Outcome("first-rollout", True, before, after, gates))

    def live_gates(self, golden: GoldenSet) -> list[GateResult]:
        """Quality and latency of canary vs stable on `golden`, through the live servers'
        labels. ReplicaUnreachableError, and no verdict, when calls failed because a replica
        does not answer at all: that is the infrastructure's fault, not the candidate's."""
        routes = {"stable": {"version_label": STABLE}, "canary": {"version_label": CANARY}}
        stats = golden_traffic(self.servers_now(), self.model, routes, golden)
        suspects = sorted({t for route in stats.values() for t in route.unanswered_targets()})
        if suspects:
            check_reachable(suspects, self.model)
        gates = [
            quality_gate(stats["canary"], stats["stable"], self.settings.gates),
            latency_gate(stats["canary"], stats["stable"], self.settings.gates),
        ]
        for gate in gates:
            self._say_gate(gate)
        return gates

    def _stopped_at_canary(
        self, error: ReplicaUnreachableError, state: ModelState, version: int
    ) -> RolloutError:
        """The error of a rollout stopped by an unreachable replica while the canary was
        under test: nothing more is written; the config stays at the canary step, which every
        replica had reached (stable serves as before)."""
        self.say(f"{error}: stopping at the canary step, nothing blamed on version {version}")
        return RolloutError(
            f"{error}; infrastructure fault, not counted against version {version}; stopped "
            f"at the canary step ({describe_state(state)}); rerun `convstack rollout run "
            f"{version}` once every replica answers, or roll the canary back"
        )

    def servers_now(self) -> list[str]:
        return expand_targets(self.servers)

    def _roll_back_failed(self, attempt, before, after, gates) -> Outcome:
        failed = ", ".join(gate.name for gate in gates if not gate.passed)
        self.say(f"gate failed ({failed}): rolling the canary back")
        # Its writes are the auto-rollback's, so that a rerun of the run finishes them.
        rolled_back = self._apply(rollout_plan.rollback(after), after, Attempt(AUTO_ROLLBACK))
        detail = f"the {failed} gate failed; canary {after.canary} rolled back"
        return self._record(Outcome(attempt.action, False, before, rolled_back, gates, detail))

    def promote(self) -> Outcome:
        """stable -> canary; the old stable stays loaded as previous."""
        self._need_servers("promote")
        with self._attempt("promote") as attempt:
            before = attempt.before = self.state()
            self._close_interrupted(before)
            record, pending = self._unfinished(("promote",), before)
            if record:
                after = self._finish(record, pending, before)
                detail = "finished the promote an interrupted rollout left"
                return self._record(Outcome("promote", True, before, after, detail=detail))
            steps = rollout_plan.promote(before)
            self._preflight()
            after = self._apply(steps, before, attempt)
            self.say(
                f"version {after.stable} is stable; {after.labels.get('previous')} is previous"
            )
            return self._record(Outcome("promote", True, before, after))

    def rollback(self, to: int | None = None) -> Outcome:
        """Drop a live canary, else stable -> previous (or `to`); the bad version unloads."""
        self._need_servers("rollback")
        with self._attempt("rollback") as attempt:
            before = attempt.before = self.state()
            self._close_interrupted(before)
            record, pending = self._unfinished(("rollback", AUTO_ROLLBACK), before)
            if record and (to is None or record["goal"]["labels"].get(STABLE) == to):
                after = self._finish(record, pending, before)
                detail = f"finished the {record['action']} an interrupted rollout left"
                return self._record(Outcome("rollback", True, before, after, detail=detail))
            if to is not None:
                find_version(self.repository(), to)
            steps = rollout_plan.rollback(before, to)
            self._preflight()
            after = self._apply(steps, before, attempt)
            self.say(f"rolled back: stable is version {after.stable}")
            return self._record(Outcome("rollback", True, before, after))

    def run(self, version: int) -> Outcome:
        """canary -> observe -> promote, or an automatic rollback when a gate fails. A rerun
        picks up from the step the config shows: once `version` is stable there is nothing
        left to do but a stopped unload."""
        self._need_servers("run")
        with self._attempt("run") as attempt:
            before = attempt.before = self.state()
            self._close_interrupted(before)
            record, pending = self._unfinished((AUTO_ROLLBACK,), before)
            if record and version in record["from"]["versions"]:
                return self._finish_rejection(version, record, pending, before)
            if before.stable == version and before.canary is None:
                return self._already_stable(version, before, attempt)
            self._preflight()  # here too, so that a refusal is recorded as the run's
            outcome = self.canary(version)
            if not outcome.ok or outcome.action == "first-rollout":
                return outcome
            after_canary = outcome.after
            golden = self.golden(find_version(self.repository(), version))
            deadline = time.monotonic() + self.settings.observe_seconds
            while time.monotonic() < deadline:
                self.say("observing the canary: golden traffic again")
                try:
                    gates = self.live_gates(golden)
                except ReplicaUnreachableError as error:
                    raise self._stopped_at_canary(error, after_canary, version) from error
                if not all(gate.passed for gate in gates):
                    attempt.gates = gates
                    return self._roll_back_failed(attempt, outcome.before, self.state(), gates)
            promoted = self.promote()
            return Outcome("run", True, outcome.before, promoted.after, outcome.gates)

    def _finish_rejection(
        self, version: int, record: dict, pending: list[Step], before: ModelState
    ) -> Outcome:
        """`run VERSION` again after a run whose gates rejected VERSION was killed during its
        automatic rollback: the rollback is finished, and the verdict stands (not ok, as the
        run would have ended); a new attempt at VERSION is a run after this one."""
        after = self._finish(record, pending, before)
        detail = (
            f"version {version} was rolled back: its gates failed in the interrupted run, "
            "whose automatic rollback this rerun finished"
        )
        return self._record(Outcome("run", False, before, after, detail=detail))

    def _already_stable(self, version: int, before: ModelState, attempt: Attempt) -> Outcome:
        """`run VERSION` when VERSION is stable already: the goal is reached, or only the
        promote's unload is left (a rollout stopped after its label step)."""
        pending = rollout_plan.steps_to(before, before.labels)
        if not pending:
            detail = f"version {version} is already stable: nothing to do"
            return Outcome("run", True, before, before, detail=detail)
        self._preflight()
        self.say(f"version {version} is already stable; finishing what the last run left")
        after = self._apply(pending, before, attempt)
        detail = f"version {version} was already stable; finished its {pending[-1].name} step"
        return self._record(Outcome("run", True, before, after, detail=detail))

    def retire(self, keep: int, delete: bool) -> list[VersionOnDisk]:
        """Versions neither labelled, nor listed in the config, nor among the `keep` newest;
        deleted only with `delete` (otherwise a dry run)."""
        config = self.config()
        state = self.state(config)
        disk = self.disk_versions(config)
        protected = set(state.versions) | set(state.labels.values())
        doomed = set(versions_to_retire([v.version for v in disk], keep, protected))
        retiring = [v for v in disk if v.version in doomed]
        if delete and retiring:
            deleted: list[int] = []
            try:
                for version in retiring:
                    delete_version(version)
                    deleted.append(version.version)
            finally:
                if deleted:
                    detail = f"deleted versions {deleted}"
                    self._record(Outcome("retire", True, state, self.state(), detail=detail))
        return retiring

    def _say_gate(self, gate: GateResult, where: str = "") -> None:
        self.say(f"  gate {gate.line()}" + (f" ({where})" if where else ""))


def _as_json(record: dict) -> str:
    # {"versions": [...], "labels": {...}} compared as text: key order and JSON's str keys
    # do not matter then.
    return json.dumps(record, sort_keys=True)


def describe_state(state: ModelState) -> str:
    """`stable 1, canary 2; versions [1, 2]`: a state as a rollout's messages name it."""
    labels = ", ".join(f"{label} {v}" for label, v in sorted(state.labels.items()))
    return f"{labels or 'no labels'}; versions {sorted(state.versions)}"
