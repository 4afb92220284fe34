"""`convstack k8s train` on the cluster: create a planned training Job (with what it needs),
stream its chief pod's log, wait until it finishes and read how it ended."""

from __future__ import annotations

import logging
from typing import TextIO

from convstack import k8s_render
from convstack.k8s_errors import EXIT_OK, EXIT_TIMEOUT
from convstack.k8s_objects import owned_by
from convstack.k8s_training_plan import (
    TRAINER_CONTAINER,
    TrainingPlan,
    chief_selector,
    job_selector,
)
from convstack.k8s_training_status import (
    TrainingOutcome,
    creation_order,
    job_finished,
    job_progress,
    pod_started,
    training_outcome,
)
from convstack.k8s_waiting import Follow, wait_until
from serving.kube_api import KubeApi, KubeError, KubeInvalidError

log = logging.getLogger(__name__)


def train(api: KubeApi, plan: TrainingPlan, follow: Follow) -> TrainingOutcome:
    """Launch the plan and, unless `follow.follow` is off, wait for the Job's outcome."""
    job = launch_training(api, plan)
    name = job["metadata"]["name"]
    run_dir = f", run directory {plan.run_dir}" if plan.run_dir else ""
    if not follow.follow:
        return TrainingOutcome(
            EXIT_OK,
            f"created Job {plan.namespace}/{name}{run_dir}; follow it with "
            f"{_logs_command(plan.namespace, name)}",
        )
    outcome = wait_for_job(api, job, follow)
    if run_dir and outcome.exit_status != EXIT_TIMEOUT:
        outcome.summary += run_dir
    return outcome


def launch_training(api: KubeApi, plan: TrainingPlan) -> dict:
    """Create the prerequisites (server-side apply), the Job, and its Service owned by it."""
    for obj in plan.prerequisites:
        api.apply(obj)
        log.info("applied %s", k8s_render.describe(obj))
    job = api.create_job(plan.namespace, plan.job)
    log.info("created %s", k8s_render.describe(job))
    if plan.service is not None:
        try:
            service = api.create(owned_by(plan.service, job))
        except KubeError:
            # Without its Service the workers cannot find each other: do not leave it running.
            api.delete("Job", plan.namespace, job["metadata"]["name"])
            raise
        log.info("created %s", k8s_render.describe(service))
    return job


def wait_for_job(api: KubeApi, job: dict, follow: Follow) -> TrainingOutcome:
    """Follow the chief pod's log (each attempt's), until the Job finishes or time runs out."""
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    streamed: set[str] = set()

    def check() -> tuple[TrainingOutcome | None, str]:
        current, chiefs = _job_and_chiefs(api, job)
        # Each streamed log has probably ended with its pod: look again at once.
        while follow.follow and _stream_next_log(api, namespace, chiefs, streamed, follow.out):
            current, chiefs = _job_and_chiefs(api, job)
        if job_finished(current) is not None:
            return training_outcome(current, api.list_pods(namespace, job_selector(name))), ""
        return None, job_progress(job, chiefs)

    outcome, progress = wait_until(follow, check)
    if outcome is not None:
        return outcome
    return TrainingOutcome(
        EXIT_TIMEOUT,
        f"Job {namespace}/{name} still running after {follow.timeout:g} s ({progress}); "
        f"it goes on: {_logs_command(namespace, name)}",
    )


def _job_and_chiefs(api: KubeApi, job: dict) -> tuple[dict, list[dict]]:
    """The Job as it is now, and its chief pods (one per attempt), oldest first."""
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    current = api.get_job(namespace, name)
    return current, sorted(api.list_pods(namespace, chief_selector(job)), key=creation_order)


def _stream_next_log(
    api: KubeApi, namespace: str, chiefs: list[dict], streamed: set[str], out: TextIO
) -> bool:
    """Stream the log of the oldest started chief not yet streamed; whether one was.

    Every attempt's log, in order: creation times have one-second resolution, so "the newest
    pod" alone could skip a replacement."""
    unread = [p for p in chiefs if pod_started(p) and p["metadata"]["name"] not in streamed]
    if not unread:
        return False
    pod_name = unread[0]["metadata"]["name"]
    if not _stream_log(api, namespace, pod_name, out):
        return False
    streamed.add(pod_name)
    return True


def _stream_log(api: KubeApi, namespace: str, pod: str, out: TextIO) -> bool:
    """Copy the pod's log to `out` until the container exits; False if it has not started
    after all (the API answers 400), so the caller tries again later."""
    log.info("log of pod %s:", pod)
    try:
        for line in api.follow_pod_log(namespace, pod, TRAINER_CONTAINER):
            out.write(line + "\n")
            out.flush()
    except KubeInvalidError as exc:
        log.info("%s", exc)
        return False
    return True


def _logs_command(namespace: str, name: str) -> str:
    return f"kubectl -n {namespace} logs -f job/{name}"
