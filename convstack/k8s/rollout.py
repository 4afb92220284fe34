"""`convstack k8s rollout` on the cluster: create the planned rollout Job, stream its log, wait
until it finishes and turn how it ended into the rollout command's exit status (0 done, 1 a gate
failed or the rollout stopped, 2 bad input) and one line."""

from __future__ import annotations

import logging

from convstack.common.kube_api import KubeApi
from convstack.k8s import render
from convstack.k8s.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_OOM_KILLED,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    ROLLOUT_BAD_INPUT,
    ROLLOUT_STOPPED,
)
from convstack.k8s.job_follow import JobWatch, wait_for_job
from convstack.k8s.job_status import (
    JobOutcome,
    describe_termination,
    failed_condition,
    job_finished,
    job_selector,
    job_target,
    memory_limit_hint,
    newest,
    terminated_state,
)
from convstack.k8s.objects import true_conditions
from convstack.k8s.rollout_plan import ROLLOUT_CONTAINER, RolloutPlan, rollout_words
from convstack.k8s.waiting import Follow

log = logging.getLogger(__name__)

# A rollout stopped from outside may have left a canary loaded: say how to look.
MIDWAY_HINT = "; see what it left with `convstack k8s rollout --overlay OVERLAY -- status`"


def rollout_outcome(job: dict, pods: list[dict]) -> JobOutcome:
    """How a finished rollout Job ended. backoffLimit 0: its one pod's exit code is the rollout
    command's verdict; anything else (OOMKilled, eviction, deadline) stopped it midway."""
    target, command = job_target(job), rollout_words(job)
    if job_finished(job) == "Complete":
        return JobOutcome(EXIT_OK, f"{target}: `{command}` done")
    ended = [p for p in pods if terminated_state(p, ROLLOUT_CONTAINER) is not None]
    last = newest(ended)
    why = failed_condition(job)
    if last is None:
        return JobOutcome(EXIT_FAILED, f"{target} failed before `{command}` ran: {why}")
    details = [describe_termination(last, ROLLOUT_CONTAINER)]
    status, verdict = _verdict(last, command)
    return JobOutcome(status, f"{target}: {verdict} ({why})", details)


def _verdict(pod: dict, command: str) -> tuple[int, str]:
    """The exit status and verdict of a rollout pod that ended with a failure."""
    state = terminated_state(pod, ROLLOUT_CONTAINER) or {}
    code = state.get("exitCode")
    if state.get("reason") == "OOMKilled":
        limit = memory_limit_hint(pod, ROLLOUT_CONTAINER)
        return EXIT_OOM_KILLED, f"`{command}` was OOMKilled{limit}{MIDWAY_HINT}"
    if "DisruptionTarget" in true_conditions(pod):
        return EXIT_PREEMPTED, f"`{command}` was interrupted: its pod was evicted{MIDWAY_HINT}"
    if code == ROLLOUT_STOPPED:
        return EXIT_FAILED, (
            f"`{command}` stopped (exit {code}): a gate failed or a version did not load; "
            "stable is as it was or rolled back, the log above has the gates' figures"
        )
    if code == ROLLOUT_BAD_INPUT:
        return EXIT_USAGE, (
            f"`{command}` refused its input (exit {code}): the log above says what was wrong"
        )
    return (
        EXIT_FAILED,
        f"`{command}` failed: {describe_termination(pod, ROLLOUT_CONTAINER)}{MIDWAY_HINT}",
    )


ROLLOUT_WATCH = JobWatch(
    ROLLOUT_CONTAINER, lambda job: job_selector(job["metadata"]["name"]), rollout_outcome
)


def rollout(api: KubeApi, plan: RolloutPlan, follow: Follow) -> JobOutcome:
    """Create the plan's Job, stream its log and wait for its outcome."""
    job = api.create_job(plan.namespace, plan.job)
    log.info("created %s running `%s`", render.describe(job), rollout_words(job))
    return wait_for_job(api, job, follow, ROLLOUT_WATCH)
