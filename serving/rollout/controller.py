"""Rollouts of model versions on TF Serving replicas, driven through models.config alone.

`Rollout` runs the verbs of `convstack rollout`: status, canary, promote, rollback, run and
retire. Each verb plans its config steps (serving/rollout/plan.py), writes them one at a time
through a config store with optimistic concurrency (serving/rollout/store.py), waits after each
until every server replica serves it (serving/rollout/watch.py), and records the change with
its gate results in the append-only history next to the versions (serving/rollout/history.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from convstack.serving.model_config import ModelServerConfig
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
from convstack.serving.rollout.history import append_record, make_record
from convstack.serving.rollout.plan import CANARY, STABLE, ModelState, Step
from convstack.serving.rollout.repository import (
    VersionOnDisk,
    delete_version,
    find_version,
    list_versions,
    version_numbers,
    versions_to_retire,
)
from convstack.serving.rollout.store import ConfigStore, ConfigStoreError, update_config
from convstack.serving.rollout.watch import ReplicaView, WatchError, expand_targets, wait_for_state

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
class RolloutSettings:
    """How a rollout waits and observes (flags of `convstack rollout`)."""

    wait_timeout: float = 300.0
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

    def _write(self, step: Step, expected: ModelState) -> None:
        def edit(config: ModelServerConfig) -> ModelServerConfig:
            found = self.state(config)
            if found != expected:
                raise ConcurrentChangeError(
                    f"{self.store.uri}: model {self.model!r} changed during the rollout "
                    f"(expected {expected.as_record()}, found {found.as_record()}); stopped"
                )
            return rollout_plan.apply_state(config, self.model, step.state)

        update_config(self.store, edit)

    def _wait(self, state: ModelState) -> list[ReplicaView]:
        return wait_for_state(self.servers, self.model, state, self.settings.wait_timeout)

    def _apply(self, steps: list[Step], before: ModelState) -> ModelState:
        """Write and wait for each step. A version failing to load (or a load step that times
        out) puts the model back as it was before and raises RolloutError."""
        current = before
        for step in steps:
            self.say(
                f"  {step.name}: versions {sorted(step.state.versions)}, labels "
                f"{dict(sorted(step.state.labels.items()))}"
            )
            self._write(step, current)
            try:
                self._wait(step.state)
            except WatchError as error:
                if step.name != "load":
                    raise RolloutError(f"{error}; the config is at the {step.name} step") from error
                self._undo_load(step.state, before)
                raise RolloutError(f"{error}; the load was undone") from error
            current = step.state
        return current

    def _undo_load(self, loaded: ModelState, before: ModelState) -> None:
        self.say(f"  undo: back to versions {sorted(before.versions)}")
        self._write(Step("unload", before), loaded)
        self._wait(before)

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
        config = self.config()
        before = self.state(config)
        candidate = find_version(self.repository(config), version)
        # Plan first: a verb that does not apply is refused before any gate runs.
        steps = (
            rollout_plan.first_rollout(before, version)
            if before.stable is None
            else rollout_plan.canary(before, version)
        )
        golden = self.golden(candidate)
        self.say(f"golden set: {len(golden.labels)} examples from {golden.source}")
        infra, sandbox_stats = self.infra_check(candidate, golden)
        self._say_gate(infra)
        if not infra.passed:
            detail = f"version {version} failed infra validation"
            return self._record(Outcome("canary", False, before, before, [infra], detail))
        if before.stable is None:
            return self._first_rollout(version, before, steps, infra, sandbox_stats)
        after = self._apply_plan(steps, before, "canary", [infra])
        gates = [infra, *self.live_gates(golden)]
        if all(gate.passed for gate in gates):
            self.say(f"version {version} is the canary next to stable {after.stable}")
            return self._record(Outcome("canary", True, before, after, gates))
        return self._roll_back_failed("canary", before, after, gates)

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

    def _first_rollout(self, version, before, steps, infra, sandbox_stats) -> Outcome:
        quality = quality_gate(sandbox_stats, None, self.settings.gates)
        latency = latency_gate(sandbox_stats, None, self.settings.gates)
        for gate in (quality, latency):
            self._say_gate(gate, where="in the sandbox")
        gates = [infra, quality, latency]
        if not quality.passed:
            return self._record(
                Outcome(
                    "first-rollout",
                    False,
                    before,
                    before,
                    gates,
                    f"version {version} below the accuracy floor",
                )
            )
        after = self._apply_plan(steps, before, "first-rollout", gates)
        self.say(f"version {version} is stable (first rollout of {self.model!r})")
        return self._record(Outcome("first-rollout", True, before, after, gates))

    def _apply_plan(self, steps, before, action, gates) -> ModelState:
        try:
            return self._apply(steps, before)
        except (RolloutError, ConfigStoreError) as error:
            self._record(Outcome(action, False, before, self.state(), list(gates), str(error)))
            raise

    def live_gates(self, golden: GoldenSet) -> list[GateResult]:
        """Quality and latency of canary vs stable on `golden`, through the live servers'
        labels."""
        routes = {"stable": {"version_label": STABLE}, "canary": {"version_label": CANARY}}
        stats = golden_traffic(self.servers_now(), self.model, routes, golden)
        gates = [
            quality_gate(stats["canary"], stats["stable"], self.settings.gates),
            latency_gate(stats["canary"], stats["stable"], self.settings.gates),
        ]
        for gate in gates:
            self._say_gate(gate)
        return gates

    def servers_now(self) -> list[str]:
        return expand_targets(self.servers)

    def _roll_back_failed(self, action, before, after, gates) -> Outcome:
        failed = ", ".join(gate.name for gate in gates if not gate.passed)
        self.say(f"gate failed ({failed}): rolling the canary back")
        rolled_back = self._apply(rollout_plan.rollback(after), after)
        detail = f"the {failed} gate failed; canary {after.canary} rolled back"
        return self._record(Outcome(action, False, before, rolled_back, gates, detail))

    def promote(self) -> Outcome:
        """stable -> canary; the old stable stays loaded as previous."""
        self._need_servers("promote")
        before = self.state()
        after = self._apply_plan(rollout_plan.promote(before), before, "promote", [])
        self.say(f"version {after.stable} is stable; {after.labels.get('previous')} is previous")
        return self._record(Outcome("promote", True, before, after))

    def rollback(self, to: int | None = None) -> Outcome:
        """Drop a live canary, else stable -> previous (or `to`); the bad version unloads."""
        self._need_servers("rollback")
        before = self.state()
        if to is not None:
            find_version(self.repository(), to)
        after = self._apply_plan(rollout_plan.rollback(before, to), before, "rollback", [])
        self.say(f"rolled back: stable is version {after.stable}")
        return self._record(Outcome("rollback", True, before, after))

    def run(self, version: int) -> Outcome:
        """canary -> observe -> promote, or an automatic rollback when a gate fails."""
        outcome = self.canary(version)
        if not outcome.ok or outcome.action == "first-rollout":
            return outcome
        golden = self.golden(find_version(self.repository(), version))
        deadline = time.monotonic() + self.settings.observe_seconds
        while time.monotonic() < deadline:
            self.say("observing the canary: golden traffic again")
            gates = self.live_gates(golden)
            if not all(gate.passed for gate in gates):
                state = self.state()
                return self._roll_back_failed("run", outcome.before, state, gates)
        promoted = self.promote()
        return Outcome("run", True, outcome.before, promoted.after, outcome.gates)

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
