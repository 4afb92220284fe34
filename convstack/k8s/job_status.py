"""How a Job the `convstack k8s` commands launched is doing, read from the Job's and its pods'
status (plain dicts as the API returns them), for any of its containers: whether it finished,
where its pods are, how a container ended. The verdicts specific to training and to rollouts
are in k8s_training_status and k8s_rollout."""

from __future__ import annotations

from dataclasses import dataclass, field

from convstack.k8s.objects import named_container, true_conditions

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


@dataclass
class JobOutcome:
    """How a launched Job ended: the command's exit status, the one-line verdict, and a line
    per failed pod."""

    exit_status: int
    summary: str
    details: list[str] = field(default_factory=list)


def job_selector(name: str) -> str:
    """Label selector of all pods of Job `name` (every index, every attempt)."""
    return f"{JOB_NAME_LABEL}={name}"


def job_finished(job: dict) -> str | None:
    """ "Complete", "Failed" or None while the Job runs."""
    conditions = true_conditions(job)
    for state in ("Complete", "Failed"):
        if state in conditions:
            return state
    return None


def job_target(job: dict) -> str:
    """`Job NAMESPACE/NAME`, as the verdicts name it."""
    return f"Job {job['metadata'].get('namespace')}/{job['metadata']['name']}"


def creation_order(pod: dict) -> tuple[str, str]:
    """Sort key of pods, oldest first (the name breaks ties of the one-second timestamps)."""
    return pod["metadata"].get("creationTimestamp", ""), pod["metadata"]["name"]


def newest(pods: list[dict]) -> dict | None:
    return max(pods, key=creation_order, default=None)


def _container_status(pod: dict, container: str) -> dict:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            return status
    return {}


def terminated_state(pod: dict, container: str) -> dict | None:
    """The container's `terminated` state, or None while it has not ended."""
    return (_container_status(pod, container).get("state") or {}).get("terminated")


def pod_started(pod: dict, container: str) -> bool:
    """Whether the container has started (so it has a log to read)."""
    state = _container_status(pod, container).get("state") or {}
    return "running" in state or "terminated" in state


def pod_progress(pod: dict, container: str) -> str:
    """One line on where a pod is: phase, and why it waits (image pull, scheduling)."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    phase = status.get("phase", "Unknown")
    state = _container_status(pod, container).get("state") or {}
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


def job_progress(job: dict, pods: list[dict], container: str) -> str:
    """One line on where a running Job is: its running pod's progress (else the newest
    pod's), or that it has no pod yet. `pods` are oldest first."""
    running = [p for p in pods if terminated_state(p, container) is None]
    pod = (running or pods or [None])[-1]
    if pod is None:
        return f"Job {job['metadata']['namespace']}/{job['metadata']['name']}: no pod yet"
    return pod_progress(pod, container)


def describe_termination(pod: dict, container: str) -> str:
    """`pod NAME: CONTAINER exited CODE (REASON)`, and the disruption that ended it if any."""
    state = terminated_state(pod, container) or {}
    text = f"pod {pod['metadata']['name']}: {container} exited {state.get('exitCode', '?')}"
    if state.get("reason"):
        text += f" ({state['reason']})"
    disruption = true_conditions(pod).get("DisruptionTarget")
    if disruption:
        text += (
            f", disrupted: {disruption.get('reason', '')} {disruption.get('message', '')}".rstrip()
        )
    return text


def failed_condition(job: dict) -> str:
    """Why a failed Job failed, from its Failed condition: `REASON: MESSAGE`."""
    condition = true_conditions(job).get("Failed") or {}
    reason = condition.get("reason", "unknown reason")
    message = condition.get("message", "")
    return f"{reason}: {message}" if message else reason


def memory_limit_hint(pod: dict, container: str) -> str:
    """` (memory limit 3Gi)` for the container's limit, or "" when it has none."""
    spec = named_container(pod.get("spec"), container) or {}
    limit = ((spec.get("resources") or {}).get("limits") or {}).get("memory")
    return f" (memory limit {limit})" if limit else ""
