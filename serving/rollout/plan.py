"""What a rollout changes in models.config, as pure functions of the model's current state.

A model under rollout serves a `specific` set of versions and carries the labels `stable`,
`canary` and `previous` (other labels are kept as they are). Every verb is a target (labels and
the versions to keep loaded), reached through TF Serving's safe order, one config write each:

1. load: add the versions the target needs, keep everything loaded so far;
2. label: move the labels (every labelled version is AVAILABLE by now);
3. unload: drop what the target no longer needs (no label resolves to it any more).

The rollout waits for every server after each step, so no request ever finds a label pointing
at a version that is not loaded, whatever order a server applies a config in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from convstack.serving import model_config
from convstack.serving.model_config import ModelServerConfig
from convstack.serving.version_policy import aspired_versions

STABLE = "stable"
CANARY = "canary"
PREVIOUS = "previous"
ROLLOUT_LABELS = (STABLE, CANARY, PREVIOUS)


class RolloutPlanError(ValueError):
    """The verb does not apply to the model's state (no canary to promote...); one line."""


@dataclass(frozen=True)
class ModelState:
    """The versions a model serves and its labels."""

    versions: frozenset[int]
    labels: Mapping[str, int] = field(default_factory=dict)

    @property
    def stable(self) -> int | None:
        return self.labels.get(STABLE)

    @property
    def canary(self) -> int | None:
        return self.labels.get(CANARY)

    @property
    def previous(self) -> int | None:
        return self.labels.get(PREVIOUS)

    def as_record(self) -> dict:
        """Plain JSON for the history."""
        return {"versions": sorted(self.versions), "labels": dict(sorted(self.labels.items()))}


@dataclass(frozen=True)
class Step:
    """One config write: the model serves exactly `versions` and carries exactly `labels`."""

    name: str  # load | label | unload
    state: ModelState


def model_state(
    config: ModelServerConfig, name: str, versions_on_disk: Iterable[int]
) -> ModelState:
    """The state of model `name` in `config`: the versions its policy serves among those on
    disk (for `latest`/`all`), or its `specific` list, and its labels."""
    for model in config.model_config_list.config:
        if model.name == name:
            policy = model.model_version_policy
            if policy.WhichOneof("policy_choice") == "specific":
                versions = frozenset(policy.specific.versions)
            else:
                versions = frozenset(aspired_versions(versions_on_disk, policy))
            return ModelState(versions, dict(model.version_labels))
    raise RolloutPlanError(f"model {name!r} is not in the config")


def apply_state(config: ModelServerConfig, name: str, state: ModelState) -> ModelServerConfig:
    """A copy of `config` where model `name` serves `state` (a specific policy, its labels)."""
    if not state.versions:
        raise RolloutPlanError(f"model {name!r}: a rollout never leaves a model without versions")
    edited = model_config.set_version_policy(config, name, specific=sorted(state.versions))
    return model_config.set_version_labels(edited, name, state.labels)


def steps_to(
    current: ModelState, labels: Mapping[str, int], keep: Iterable[int] = ()
) -> list[Step]:
    """The load / label / unload steps from `current` to serving exactly the labelled versions
    plus `keep`, labelled `labels`; steps that would change nothing are left out."""
    final = frozenset(labels.values()) | frozenset(keep)
    loading = current.versions | final
    steps = []
    if loading != current.versions:
        steps.append(Step("load", ModelState(loading, dict(current.labels))))
    if dict(labels) != dict(current.labels):
        steps.append(Step("label", ModelState(loading, dict(labels))))
    if final != loading:
        steps.append(Step("unload", ModelState(final, dict(labels))))
    return steps


def _other_labels(state: ModelState) -> dict[str, int]:
    return {label: v for label, v in state.labels.items() if label not in ROLLOUT_LABELS}


def first_rollout(current: ModelState, version: int) -> list[Step]:
    """No stable yet: `version` becomes stable directly (after the gates)."""
    if current.stable is not None:
        raise RolloutPlanError(f"the model already has a stable version ({current.stable})")
    return steps_to(current, {**_other_labels(current), STABLE: version})


def canary(current: ModelState, version: int) -> list[Step]:
    """Load `version` next to stable (and previous) and label it canary."""
    if current.stable is None:
        raise RolloutPlanError("the model has no stable version yet; the first rollout sets it")
    if version == current.stable:
        raise RolloutPlanError(f"version {version} is already stable")
    if current.canary is not None and current.canary != version:
        raise RolloutPlanError(
            f"version {current.canary} is already the canary; promote or roll it back first"
        )
    return steps_to(current, {**current.labels, CANARY: version})


def promote(current: ModelState) -> list[Step]:
    """stable -> the canary; the old stable stays loaded as previous (the old previous goes)."""
    if current.canary is None:
        raise RolloutPlanError("there is no canary to promote")
    labels = {**_other_labels(current), STABLE: current.canary}
    if current.stable is not None:
        labels[PREVIOUS] = current.stable
    return steps_to(current, labels)


def rollback(current: ModelState, to: int | None = None) -> list[Step]:
    """Undo the last change: drop a live canary (stable stays), else move stable back to
    previous; `to` makes that version stable instead. The bad version is unloaded."""
    others = _other_labels(current)
    if to is not None:
        if to == current.stable and current.canary is None:
            raise RolloutPlanError(f"version {to} is already stable")
        return steps_to(current, {**others, STABLE: to})
    if current.canary is not None:
        if current.stable is None:
            # Only a hand edit gets here; dropping the canary would leave nothing to serve.
            raise RolloutPlanError(
                f"version {current.canary} is the canary but there is no stable version to "
                "fall back to; use --to VERSION"
            )
        labels = {label: v for label, v in current.labels.items() if label != CANARY}
        return steps_to(current, labels)
    if current.previous is None:
        raise RolloutPlanError("nothing to roll back to: no canary and no previous version")
    return steps_to(current, {**others, STABLE: current.previous})
