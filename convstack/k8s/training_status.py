"""How a training Job ended, read from the Job's and its pods' status (plain dicts as the API
returns them): progress lines while it runs, and a TrainingOutcome (exit status and summary)
once it has finished. The trainer's exit codes and the Job's podFailurePolicy give the verdict;
the generic reading of Jobs and pods is in job_status."""

from __future__ import annotations

from convstack.k8s import job_status
from convstack.k8s.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_OOM_KILLED,
    EXIT_PREEMPTED,
    TRAINER_BAD_INPUT,
    TRAINER_PREEMPTED,
)
from convstack.k8s.job_status import (
    JobOutcome,
    creation_order,
    failed_condition,
    job_finished,
    job_target,
    memory_limit_hint,
    newest,
)
from convstack.k8s.objects import true_conditions
from convstack.k8s.training_plan import TRAINER_CONTAINER

# How `train` ended: its exit status, the one-line verdict, and a line per failed pod.
TrainingOutcome = JobOutcome


def terminated_state(pod: dict) -> dict | None:
    """The trainer container's `terminated` state, or None while it has not ended."""
    return job_status.terminated_state(pod, TRAINER_CONTAINER)


def was_preempted(pod: dict) -> bool:
    """DisruptionTarget (preemption, eviction, drain) or the trainer's SIGTERM exit 75."""
    state = terminated_state(pod)
    return "DisruptionTarget" in true_conditions(pod) or bool(
        state and state.get("exitCode") == TRAINER_PREEMPTED
    )


def job_progress(job: dict, chiefs: list[dict]) -> str:
    """One line on where a running training Job is (`chiefs` oldest first)."""
    return job_status.job_progress(job, chiefs, TRAINER_CONTAINER)


def describe_termination(pod: dict) -> str:
    """`pod NAME: trainer exited CODE (REASON)`, and the disruption that ended it if any."""
    return job_status.describe_termination(pod, TRAINER_CONTAINER)


# -- how a finished Job ended ---------------------------------------------------------------


def training_outcome(job: dict, pods: list[dict]) -> TrainingOutcome:
    """How a finished Job ended, from its status and its pods' (all indexes, all attempts).

    Bad input (the podFailurePolicy's FailJob on exit 2) wins over everything; otherwise the
    newest failed pod says whether it was OOMKilled or preempted; preemptions the Job survived
    are listed with a success.
    """
    target = job_target(job)
    failed = [p for p in pods if _failed_attempt(p)]
    details = [describe_termination(p) for p in sorted(failed, key=creation_order)]
    if job_finished(job) == "Complete":
        return TrainingOutcome(EXIT_OK, _success(target, failed), details)
    status, summary = _failure(job, target, newest(failed))
    return TrainingOutcome(status, summary, details)


def _failed_attempt(pod: dict) -> bool:
    state = terminated_state(pod)
    return bool(state) and state.get("exitCode") != 0


def _success(target: str, failed: list[dict]) -> str:
    """The verdict on a completed Job, counting the preemptions and failures it survived."""
    preempted = [p for p in failed if was_preempted(p)]
    survived = (
        f" after {len(preempted)} preemption(s), resumed from checkpoints" if preempted else ""
    )
    retried = len(failed) - len(preempted)
    retries = f" and {retried} failed attempt(s)" if retried else ""
    return f"{target} succeeded{survived}{retries}"


def _failure(job: dict, target: str, last: dict | None) -> tuple[int, str]:
    """Exit status and verdict of a failed Job whose newest failed pod is `last`."""
    why = failed_condition(job)
    if last is None:
        return EXIT_FAILED, f"{target} failed: {why}"
    state = terminated_state(last) or {}
    reason = (true_conditions(job).get("Failed") or {}).get("reason")
    if reason == "PodFailurePolicy" and state.get("exitCode") == TRAINER_BAD_INPUT:
        return EXIT_BAD_INPUT, (
            f"{target} failed on bad input: the trainer exited {TRAINER_BAD_INPUT}, so the Job "
            f"was not retried ({why}); its log above says what was wrong"
        )
    if state.get("reason") == "OOMKilled":
        return EXIT_OOM_KILLED, (
            f"{target} failed: {last['metadata']['name']} was OOMKilled"
            f"{memory_limit_hint(last, TRAINER_CONTAINER)}, exit code "
            f"{state.get('exitCode')} ({why})"
        )
    if was_preempted(last):
        return EXIT_PREEMPTED, (
            f"{target} ended while preempted: {describe_termination(last)} ({why}); rerun with "
            "the same --run-dir to resume from its checkpoint"
        )
    return EXIT_FAILED, f"{target} failed: {describe_termination(last)} ({why})"
