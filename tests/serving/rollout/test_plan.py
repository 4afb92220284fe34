"""Rollout planning (serving/rollout/plan.py): the steps of every verb from various states, the
load -> label -> unload order, and the round trip through a real ModelServerConfig."""

from __future__ import annotations

import random

import pytest

from convstack.serving import model_config
from convstack.serving.rollout.plan import (
    CANARY,
    PREVIOUS,
    STABLE,
    ModelState,
    RolloutPlanError,
    Step,
    apply_state,
    canary,
    first_rollout,
    model_state,
    promote,
    rollback,
    steps_to,
)

NAME = "digits"
BASE = "/models/digits"


def state(versions, **labels) -> ModelState:
    return ModelState(frozenset(versions), labels)


def step(name: str, versions, **labels) -> Step:
    return Step(name, state(versions, **labels))


def config_with(**policy) -> model_config.ModelServerConfig:
    config = model_config.add_model(model_config.ModelServerConfig(), NAME, BASE, **policy)
    # Another model in the same file, which no rollout of NAME may touch.
    return model_config.add_model(config, "other", "/models/other", specific=[7], labels={"x": 7})


def check_order(current: ModelState, steps: list[Step]) -> None:
    """The safe order: load (versions grow, labels kept), label (versions kept), unload
    (versions shrink, labels kept); every label on a version of its own step."""
    names = [s.name for s in steps]
    assert names == sorted(names, key=["load", "label", "unload"].index), names
    assert len(set(names)) == len(names), names
    previous = current
    for s in steps:
        assert set(s.state.labels.values()) <= s.state.versions, s
        if s.name == "load":
            assert s.state.versions > previous.versions
            assert s.state.labels == previous.labels
        elif s.name == "label":
            assert s.state.versions == previous.versions
            assert s.state.labels != previous.labels
        else:
            assert s.state.versions < previous.versions
            assert s.state.labels == previous.labels
        previous = s.state
    if steps:
        # The model ends serving exactly its labelled versions.
        assert steps[-1].state.versions == frozenset(steps[-1].state.labels.values())


# --- model_state / apply_state -----------------------------------------------------------------


def test_model_state_of_a_latest_policy_is_the_newest_versions_on_disk():
    assert model_state(config_with(latest=1), NAME, [1, 3, 2]) == state({3})
    assert model_state(config_with(latest=2), NAME, [1, 3, 2]) == state({2, 3})
    assert model_state(config_with(all=True), NAME, [1, 3, 2]) == state({1, 2, 3})


def test_model_state_of_a_specific_policy_is_its_list_and_labels():
    config = model_config.set_version_labels(
        config_with(specific=[2, 4]), NAME, {STABLE: 2, CANARY: 4}
    )
    assert model_state(config, NAME, [1, 2]) == state({2, 4}, stable=2, canary=4)


def test_model_state_of_an_unknown_model_is_refused():
    with pytest.raises(RolloutPlanError, match="'nope' is not in the config"):
        model_state(config_with(), "nope", [1])


def test_apply_state_never_leaves_a_model_without_versions():
    with pytest.raises(RolloutPlanError, match="without versions"):
        apply_state(config_with(), NAME, state(set()))


def random_state(rng: random.Random) -> ModelState:
    versions = set(rng.sample(range(1, 9), rng.randint(1, 5)))
    labels = {}
    for label in (STABLE, CANARY, PREVIOUS, "pinned"):
        if rng.random() < 0.6:
            labels[label] = rng.choice(sorted(versions))
    return ModelState(frozenset(versions), labels)


def test_apply_state_and_model_state_round_trip_through_the_config_text():
    rng = random.Random(5)
    for _ in range(200):
        wanted = random_state(rng)
        config = apply_state(config_with(latest=1), NAME, wanted)
        model_config.validate_model_config(config)
        text = model_config.format_model_config(config)
        parsed = model_config.parse_model_config(text)
        # The versions on disk do not matter once the policy is specific.
        assert model_state(parsed, NAME, [1, 2, 99]) == wanted
        other = model_state(parsed, "other", [])
        assert other == state({7}, x=7)


def test_apply_state_returns_a_copy():
    original = config_with(latest=1)
    text = model_config.format_model_config(original)
    apply_state(original, NAME, state({1, 2}, stable=1))
    assert model_config.format_model_config(original) == text


# --- first rollout -----------------------------------------------------------------------------


def test_first_rollout_of_the_version_a_latest_policy_already_serves_only_labels_it():
    current = model_state(config_with(latest=1), NAME, [1, 2])
    assert first_rollout(current, 2) == [step("label", {2}, stable=2)]


def test_first_rollout_of_an_older_version_loads_labels_then_unloads():
    current = model_state(config_with(latest=1), NAME, [1, 2])
    steps = first_rollout(current, 1)
    assert steps == [
        step("load", {1, 2}),
        step("label", {1, 2}, stable=1),
        step("unload", {1}, stable=1),
    ]
    check_order(current, steps)


def test_first_rollout_from_an_all_policy_unloads_the_other_versions():
    current = model_state(config_with(all=True), NAME, [1, 2, 3])
    assert first_rollout(current, 3) == [
        step("label", {1, 2, 3}, stable=3),
        step("unload", {3}, stable=3),
    ]


def test_first_rollout_keeps_other_labels():
    current = state({1, 2}, pinned=1)
    assert first_rollout(current, 2) == [step("label", {1, 2}, pinned=1, stable=2)]


def test_first_rollout_is_refused_when_there_is_a_stable():
    with pytest.raises(RolloutPlanError, match=r"already has a stable version \(2\)"):
        first_rollout(state({2}, stable=2), 3)


# --- canary ------------------------------------------------------------------------------------


def test_canary_loads_next_to_stable_and_previous_then_labels():
    current = state({1, 2}, stable=2, previous=1)
    steps = canary(current, 3)
    assert steps == [
        step("load", {1, 2, 3}, stable=2, previous=1),
        step("label", {1, 2, 3}, stable=2, previous=1, canary=3),
    ]
    check_order(current, steps)


def test_canary_of_a_version_already_loaded_only_labels():
    current = state({1, 2}, stable=2, previous=1)
    assert canary(current, 1) == [step("label", {1, 2}, stable=2, previous=1, canary=1)]


def test_canary_again_of_the_same_version_changes_nothing():
    assert canary(state({2, 3}, stable=2, canary=3), 3) == []


def test_canary_is_refused_without_stable():
    with pytest.raises(RolloutPlanError, match="no stable version yet"):
        canary(state({1}), 1)


def test_canary_of_the_stable_version_is_refused():
    with pytest.raises(RolloutPlanError, match="version 2 is already stable"):
        canary(state({1, 2}, stable=2, previous=1), 2)


def test_a_second_canary_is_refused():
    with pytest.raises(RolloutPlanError, match="version 3 is already the canary"):
        canary(state({2, 3}, stable=2, canary=3), 4)


# --- promote -----------------------------------------------------------------------------------


def test_promote_keeps_the_old_stable_as_previous_and_unloads_the_old_previous():
    current = state({1, 2, 3}, stable=2, previous=1, canary=3)
    steps = promote(current)
    assert steps == [
        step("label", {1, 2, 3}, stable=3, previous=2),
        step("unload", {2, 3}, stable=3, previous=2),
    ]
    check_order(current, steps)


def test_promote_without_previous_only_moves_labels():
    current = state({2, 3}, stable=2, canary=3)
    assert promote(current) == [step("label", {2, 3}, stable=3, previous=2)]


def test_promote_without_canary_is_refused():
    with pytest.raises(RolloutPlanError, match="no canary to promote"):
        promote(state({1, 2}, stable=2, previous=1))


# --- rollback ----------------------------------------------------------------------------------


def test_rollback_of_a_canary_drops_it_and_keeps_stable_and_previous():
    current = state({1, 2, 3}, stable=2, previous=1, canary=3)
    steps = rollback(current)
    assert steps == [
        step("label", {1, 2, 3}, stable=2, previous=1),
        step("unload", {1, 2}, stable=2, previous=1),
    ]
    check_order(current, steps)


def test_rollback_without_canary_moves_stable_back_to_previous():
    current = state({1, 2}, stable=2, previous=1)
    assert rollback(current) == [
        step("label", {1, 2}, stable=1),
        step("unload", {1}, stable=1),
    ]


def test_rollback_to_a_version_not_loaded_loads_it_first():
    current = state({2, 3}, stable=3, previous=2)
    steps = rollback(current, to=1)
    assert steps == [
        step("load", {1, 2, 3}, stable=3, previous=2),
        step("label", {1, 2, 3}, stable=1),
        step("unload", {1}, stable=1),
    ]
    check_order(current, steps)


def test_rollback_to_the_stable_version_drops_the_canary():
    current = state({2, 3}, stable=2, canary=3)
    assert rollback(current, to=2) == [
        step("label", {2, 3}, stable=2),
        step("unload", {2}, stable=2),
    ]


def test_rollback_to_the_stable_version_without_canary_is_refused():
    with pytest.raises(RolloutPlanError, match="version 2 is already stable"):
        rollback(state({1, 2}, stable=2, previous=1), to=2)


def test_rollback_of_a_canary_without_stable_is_refused():
    # A hand-edited config; dropping the canary would leave the model with no version.
    with pytest.raises(RolloutPlanError, match="no stable version to fall back to"):
        rollback(state({5}, canary=5))
    assert rollback(state({5}, canary=5), to=5) == [step("label", {5}, stable=5)]


def test_rollback_with_nothing_to_go_back_to_is_refused():
    with pytest.raises(RolloutPlanError, match="nothing to roll back to"):
        rollback(state({2}, stable=2))


# --- other labels and the order invariant ------------------------------------------------------


def test_every_verb_keeps_other_labels_and_their_versions():
    current = state({1, 2, 3}, stable=2, canary=3, pinned=1)
    for steps in (promote(current), rollback(current), rollback(current, to=3)):
        final = steps[-1].state
        assert final.labels["pinned"] == 1
        assert 1 in final.versions
        check_order(current, steps)
    steps = canary(state({1, 2}, stable=2, pinned=1), 4)
    assert steps[-1].state.labels == {STABLE: 2, CANARY: 4, "pinned": 1}


def test_steps_to_keeps_extra_versions_loaded():
    current = state({1, 2}, stable=2, previous=1)
    assert steps_to(current, {STABLE: 2}, keep=[1]) == [step("label", {1, 2}, stable=2)]


def plans(current: ModelState, rng: random.Random):
    """Every verb's steps from `current` (refusals skipped), with a description."""
    verbs = [
        ("first_rollout", lambda: first_rollout(current, rng.randint(1, 9))),
        ("canary", lambda: canary(current, rng.randint(1, 9))),
        ("promote", lambda: promote(current)),
        ("rollback", lambda: rollback(current)),
        ("rollback --to", lambda: rollback(current, to=rng.randint(1, 9))),
    ]
    for name, plan in verbs:
        try:
            yield name, plan()
        except RolloutPlanError:
            continue


def test_the_safe_order_holds_for_every_verb_from_many_random_states():
    rng = random.Random(1234)
    planned = 0
    for _ in range(400):
        current = random_state(rng)
        for verb, steps in plans(current, rng):
            planned += 1
            try:
                check_order(current, steps)
                config = config_with(latest=1)
                for s in steps:
                    # Each step is a config a validating store accepts.
                    config = apply_state(config, NAME, s.state)
                    model_config.validate_model_config(config)
                    assert model_state(config, NAME, []) == s.state
            except (AssertionError, RolloutPlanError, model_config.ModelConfigError) as error:
                raise AssertionError(f"{verb} from {current}: {steps}: {error}") from error
    assert planned > 1000  # the random states reach every verb, not only refusals
