"""Follow a Job the `convstack k8s` commands created: stream the log of its followed pods (each
attempt's, in order) until it finishes or --timeout passes, then read how it ended. Shared by
`k8s train` (the chief trainer) and `k8s rollout` (the rollout container)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from convstack.common.kube_api import KubeApi, KubeInvalidError
from convstack.k8s.errors import EXIT_TIMEOUT
from convstack.k8s.job_status import (
    JobOutcome,
    creation_order,
    job_finished,
    job_progress,
    job_selector,
    pod_started,
)
from convstack.k8s.waiting import Follow, wait_until

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobWatch:
    """What to follow of a Job: the `container` whose log is streamed, in the pods selected by
    `followed(job)` (a label selector); `outcome(job, pods)` is the verdict on the finished Job
    given all its pods."""

    container: str
    followed: Callable[[dict], str]
    outcome: Callable[[dict, list[dict]], JobOutcome]


def logs_command(namespace: str, name: str) -> str:
    return f"kubectl -n {namespace} logs -f job/{name}"


def wait_for_job(api: KubeApi, job: dict, follow: Follow, watch: JobWatch) -> JobOutcome:
    """Follow the watched pods' log (each attempt's), until the Job finishes or time runs out."""
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    streamed: set[str] = set()

    def check() -> tuple[JobOutcome | None, str]:
        current, pods = _job_and_pods(api, job, watch)
        # Each streamed log has probably ended with its pod: look again at once.
        while follow.follow and _stream_next_log(api, namespace, pods, streamed, follow, watch):
            current, pods = _job_and_pods(api, job, watch)
        if job_finished(current) is not None:
            return watch.outcome(current, api.list_pods(namespace, job_selector(name))), ""
        return None, job_progress(job, pods, watch.container)

    outcome, progress = wait_until(follow, check)
    if outcome is not None:
        return outcome
    return JobOutcome(
        EXIT_TIMEOUT,
        f"Job {namespace}/{name} still running after {follow.timeout:g} s ({progress}); "
        f"it goes on: {logs_command(namespace, name)}",
    )


def _job_and_pods(api: KubeApi, job: dict, watch: JobWatch) -> tuple[dict, list[dict]]:
    """The Job as it is now, and its followed pods (one per attempt), oldest first."""
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    current = api.get_job(namespace, name)
    pods = api.list_pods(namespace, watch.followed(job))
    return current, sorted(pods, key=creation_order)


def _stream_next_log(
    api: KubeApi,
    namespace: str,
    pods: list[dict],
    streamed: set[str],
    follow: Follow,
    watch: JobWatch,
) -> bool:
    """Stream the log of the oldest started pod not yet streamed; whether one was.

    Every attempt's log, in order: creation times have one-second resolution, so "the newest
    pod" alone could skip a replacement."""
    unread = [
        p for p in pods if pod_started(p, watch.container) and p["metadata"]["name"] not in streamed
    ]
    if not unread:
        return False
    pod_name = unread[0]["metadata"]["name"]
    if not _stream_log(api, namespace, pod_name, watch.container, follow.out):
        return False
    streamed.add(pod_name)
    return True


def _stream_log(api: KubeApi, namespace: str, pod: str, container: str, out: TextIO) -> bool:
    """Copy the container's log to `out` until it exits; False if it has not started after
    all (the API answers 400), so the caller tries again later."""
    log.info("log of pod %s:", pod)
    try:
        for line in api.follow_pod_log(namespace, pod, container):
            out.write(line + "\n")
            out.flush()
    except KubeInvalidError as exc:
        log.info("%s", exc)
        return False
    return True
