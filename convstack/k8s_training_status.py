"""How a training Job is doing and how it ended, read from the Job's and its pods' status
(plain dicts as the API returns them): progress lines while it runs, and a TrainingOutcome
(exit status and summary) once it has finished."""

from __future__ import annotations

from dataclasses import dataclass, field

from convstack.k8s_errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_OOM_KILLED,
    EXIT_PREEMPTED,
    TRAINER_BAD_INPUT,
    TRAINER_PREEMPTED,
)
from convstack.k8s_objects import named_container, true_conditions
from convstack.k8s_training_plan import TRAINER_CONTAINER


@dataclass
class TrainingOutcome:
    """How `train` ended: its exit status, the one-line verdict, and a line per failed pod."""

    exit_status: int
    summary: str
    details: list[str] = field(default_factory=list)


# -- the Job and its pods -------------------------------------------------------------------


def job_finished(job: dict) -> str | None:
    """ "Complete", "Failed" or None while the Job runs."""
    conditions = true_conditions(job)
    for state in ("Complete", "Failed"):
        if state in conditions:
            return state
    return None


def creation_order(pod: dict) -> tuple[str, str]:
    """Sort key of pods, oldest first (the name breaks ties of the one-second timestamps)."""
    return pod["metadata"].get("creationTimestamp", ""), pod["metadata"]["name"]


def newest(pods: list[dict]) -> dict | None:
    return max(pods, key=creation_order, default=None)


def _trainer_status(pod: dict) -> dict:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == TRAINER_CONTAINER:
            return status
    return {}


def terminated_state(pod: dict) -> dict | None:
    """The trainer container's `terminated` state, or None while it has not ended."""
    return (_trainer_status(pod).get("state") or {}).get("terminated")


def pod_started(pod: dict) -> bool:
    """Whether the trainer container has started (so it has a log to read)."""
    state = _trainer_status(pod).get("state") or {}
    return "running" in state or "terminated" in state


def was_preempted(pod: dict) -> bool:
    """DisruptionTarget (preemption, eviction, drain) or the trainer's SIGTERM exit 75."""
    state = terminated_state(pod)
    return "DisruptionTarget" in true_conditions(pod) or bool(
        state and state.get("exitCode") == TRAINER_PREEMPTED
    )


def pod_progress(pod: dict) -> str:
    """One line on where a pod is: phase, and why it waits (image pull, scheduling)."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    phase = status.get("phase", "Unknown")
    state = _trainer_status(pod).get("state") or {}
    if "waiting" in state:
        detail = _waiting_detail(state["waiting"])
        return f"pod {name}: {phase} ({detail})" if detail else f"pod {name}: {phase}"
    for condition in status.get("conditions") or []:
        if condition["type"] == "PodScheduled" and condition.get("status") == "False":
            return f"pod {name}: {phase} (unschedulable: {condition.get('message', '')})"
    return f"pod {name}: {phase}"


def _waiting_detail(waiting: dict) -> str:
    detail = waiting.get("reason", "")
    if waiting.get("message"):
        detail += f": {waiting['message']}"
    return detail


def job_progress(job: dict, chiefs: list[dict]) -> str:
    """One line on where a running Job is: its running chief pod's progress (else the newest
    chief's), or that it has no pod yet. `chiefs` are oldest first."""
    running = [p for p in chiefs if terminated_state(p) is None]
    chief = (running or chiefs or [None])[-1]
    if chief is None:
        return f"Job {job['metadata']['namespace']}/{job['metadata']['name']}: no pod yet"
    return pod_progress(chief)


# -- how a finished Job ended ---------------------------------------------------------------


def describe_termination(pod: dict) -> str:
    """`pod NAME: trainer exited CODE (REASON)`, and the disruption that ended it if any."""
    state = terminated_state(pod) or {}
    text = f"pod {pod['metadata']['name']}: trainer exited {state.get('exitCode', '?')}"
    if state.get("reason"):
        text += f" ({state['reason']})"
    disruption = true_conditions(pod).get("DisruptionTarget")
    if disruption:
        text += (
            f", disrupted: {disruption.get('reason', '')} {disruption.get('message', '')}".rstrip()
        )
    return text


def training_outcome(job: dict, pods: list[dict]) -> TrainingOutcome:
    """How a finished Job ended, from its status and its pods' (all indexes, all attempts).

    Bad input (the podFailurePolicy's FailJob on exit 2) wins over everything; otherwise the
    newest failed pod says whether it was OOMKilled or preempted; preemptions the Job survived
    are listed with a success.
    """
    target = f"Job {job['metadata'].get('namespace')}/{job['metadata']['name']}"
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
    condition = true_conditions(job).get("Failed") or {}
    reason = condition.get("reason", "unknown reason")
    message = condition.get("message", "")
    why = f"{reason}: {message}" if message else reason
    if last is None:
        return EXIT_FAILED, f"{target} failed: {why}"
    state = terminated_state(last) or {}
    if reason == "PodFailurePolicy" and state.get("exitCode") == TRAINER_BAD_INPUT:
        return EXIT_BAD_INPUT, (
            f"{target} failed on bad input: the trainer exited {TRAINER_BAD_INPUT}, so the Job "
            f"was not retried ({why}); its log above says what was wrong"
        )
    if state.get("reason") == "OOMKilled":
        limit = _memory_limit(last)
        hint = f" (memory limit {limit})" if limit else ""
        return EXIT_OOM_KILLED, (
            f"{target} failed: {last['metadata']['name']} was OOMKilled{hint}, exit code "
            f"{state.get('exitCode')} ({why})"
        )
    if was_preempted(last):
        return EXIT_PREEMPTED, (
            f"{target} ended while preempted: {describe_termination(last)} ({why}); rerun with "
            "the same --run-dir to resume from its checkpoint"
        )
    return EXIT_FAILED, f"{target} failed: {describe_termination(last)} ({why})"


def _memory_limit(pod: dict) -> str | None:
    trainer = named_container(pod.get("spec"), TRAINER_CONTAINER) or {}
    return ((trainer.get("resources") or {}).get("limits") or {}).get("memory")
