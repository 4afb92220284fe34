"""The rollout Job `convstack k8s rollout` would create, planned from the rendered overlays, and
how it reads a finished rollout Job (convstack/k8s/rollout_plan.py, convstack/k8s/rollout.py),
on plain dicts without a cluster."""

from __future__ import annotations

import pytest

from convstack.k8s.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_OOM_KILLED,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    ROLLOUT_BAD_INPUT,
    ROLLOUT_STOPPED,
    LaunchError,
)
from convstack.k8s.rollout import rollout_outcome
from convstack.k8s.rollout_plan import merge_rollout_args, plan_rollout
from convstack.serving.rollout import cli as rollout_cli
from tests.k8s.manifests import container

TEMPLATE = ["status", "--model=digits", "--store=configmap:ns/cm", "--servers=dns:///s:8500"]


def test_the_exit_codes_passed_on_are_the_rollout_commands():
    assert (EXIT_OK, ROLLOUT_STOPPED, ROLLOUT_BAD_INPUT) == (
        rollout_cli.EXIT_OK,
        rollout_cli.EXIT_FAILED,
        rollout_cli.EXIT_USAGE,
    )
    assert (EXIT_FAILED, EXIT_USAGE) == (ROLLOUT_STOPPED, ROLLOUT_BAD_INPUT)


@pytest.mark.parametrize(
    ("given", "merged"),
    [
        ([], TEMPLATE),
        (["run", "2"], ["run", "2", *TEMPLATE[1:]]),
        (
            ["run", "2", "--observe-seconds", "60", "--servers", "a:1"],
            ["run", "2", "--observe-seconds", "60", "--servers", "a:1", *TEMPLATE[1:3]],
        ),
        (["--json"], ["status", "--json", *TEMPLATE[1:]]),
        (
            ["rollback", "--to=1", "--model=cats"],
            ["rollback", "--to=1", "--model=cats", *TEMPLATE[2:]],
        ),
    ],
)
def test_given_arguments_replace_the_verb_and_the_flags_they_name(given, merged):
    assert merge_rollout_args(TEMPLATE, given) == merged


def test_the_plan_is_an_unsuspended_renamed_copy_of_the_template(rendered):
    plan = plan_rollout(
        rendered["local"], name="r-1", image=None, rollout_args=["promote"], namespace="team-b"
    )
    job = plan.job
    assert plan.namespace == job["metadata"]["namespace"] == "team-b"
    assert job["metadata"]["name"] == "r-1"
    assert "suspend" not in job["spec"]
    rollout = container(job, "rollout")
    assert rollout["image"] == "convstack-trainer:0.1.0"
    assert rollout["args"][0] == "promote"
    # The rendered overlay itself is left as it was.
    template = [o for o in rendered["local"] if o["metadata"]["name"] == "convstack-rollout"]
    assert [o["spec"]["suspend"] for o in template if o["kind"] == "Job"] == [True]


def test_an_overlay_without_a_template_cannot_be_planned(rendered):
    with pytest.raises(LaunchError, match=r"expected one rollout Job .* found 0"):
        plan_rollout(rendered["multiworker"], name="r", image="i:1", rollout_args=[], namespace="n")


# -- how a finished rollout Job ended --------------------------------------------------------


def job(condition: str | None, reason: str = "BackoffLimitExceeded") -> dict:
    status = {}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": reason}]
    spec = {"containers": [{"name": "rollout", "args": ["run", "2", "--model=digits"]}]}
    return {
        "metadata": {"namespace": "ns", "name": "r"},
        "spec": {"template": {"spec": spec}},
        "status": status,
    }


def pod(exit_code: int, reason: str = "Error", evicted: bool = False) -> dict:
    conditions = [{"type": "DisruptionTarget", "status": "True"}] if evicted else []
    terminated = {"exitCode": exit_code, "reason": reason}
    return {
        "metadata": {"name": "r-abcde", "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": {"containers": [{"name": "rollout", "resources": {"limits": {"memory": "4Gi"}}}]},
        "status": {
            "conditions": conditions,
            "containerStatuses": [{"name": "rollout", "state": {"terminated": terminated}}],
        },
    }


@pytest.mark.parametrize(
    ("the_pod", "status", "verdict"),
    [
        (pod(ROLLOUT_STOPPED), EXIT_FAILED, "`convstack rollout run 2` stopped (exit 1)"),
        (pod(ROLLOUT_BAD_INPUT), EXIT_USAGE, "`convstack rollout run 2` refused its input"),
        (pod(137, "OOMKilled"), EXIT_OOM_KILLED, "was OOMKilled (memory limit 4Gi); see what"),
        (pod(143, evicted=True), EXIT_PREEMPTED, "was interrupted: its pod was evicted; see"),
        (pod(3), EXIT_FAILED, "failed: pod r-abcde: rollout exited 3 (Error); see what it"),
    ],
)
def test_a_failed_rollout_is_one_line_with_the_rollouts_status(the_pod, status, verdict):
    outcome = rollout_outcome(job("Failed"), [the_pod])
    assert outcome.exit_status == status
    assert outcome.summary.startswith("Job ns/r: ")
    assert verdict in outcome.summary
    assert outcome.summary.endswith("(BackoffLimitExceeded)")
    assert len(outcome.details) == 1
    assert outcome.details[0].startswith("pod r-abcde: rollout exited ")


def test_a_completed_rollout_is_done():
    outcome = rollout_outcome(job("Complete", "CompletionsReached"), [pod(0, "Completed")])
    assert (outcome.exit_status, outcome.summary) == (
        EXIT_OK,
        "Job ns/r: `convstack rollout run 2` done",
    )


def test_a_rollout_that_never_ran_says_why():
    outcome = rollout_outcome(job("Failed", "DeadlineExceeded"), [])
    assert outcome.exit_status == EXIT_FAILED
    assert (
        outcome.summary == "Job ns/r failed before `convstack rollout run 2` ran: DeadlineExceeded"
    )
