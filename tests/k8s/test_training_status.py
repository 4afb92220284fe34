"""How `convstack k8s train` reads a Job's and its pods' status (convstack/k8s/training_status.py),
on plain dicts shaped as the API returns them."""

from __future__ import annotations

import pytest

from convstack.k8s.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_OOM_KILLED,
    EXIT_PREEMPTED,
)
from convstack.k8s.training_status import job_progress, training_outcome


def pod(
    name: str,
    created: str,
    exit_code: int,
    reason: str = "Error",
    disrupted: bool = False,
    memory: str = "3Gi",
) -> dict:
    conditions = (
        [
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "message": "Eviction API: evicting",
            }
        ]
        if disrupted
        else []
    )
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {"containers": [{"name": "trainer", "resources": {"limits": {"memory": memory}}}]},
        "status": {
            "conditions": conditions,
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"terminated": {"exitCode": exit_code, "reason": reason}},
                }
            ],
        },
    }


def job(state: str, reason: str = "", message: str = "") -> dict:
    return {
        "metadata": {"name": "j", "namespace": "ns"},
        "status": {
            "conditions": [{"type": state, "status": "True", "reason": reason, "message": message}]
        },
    }


@pytest.mark.parametrize(
    ("the_job", "pods", "status", "phrase"),
    [
        (job("Complete"), [pod("a", "1", 0, "Completed")], EXIT_OK, "Job ns/j succeeded"),
        (
            job("Complete"),
            [pod("a", "1", 143, disrupted=True), pod("b", "2", 0, "Completed")],
            EXIT_OK,
            "succeeded after 1 preemption(s)",
        ),
        (
            job("Complete"),
            [pod("a", "1", 1), pod("b", "2", 0, "Completed")],
            EXIT_OK,
            "succeeded and 1 failed attempt(s)",
        ),
        (
            job("Failed", "PodFailurePolicy", "Container trainer ... exit code 2"),
            [pod("a", "1", 2)],
            EXIT_BAD_INPUT,
            "failed on bad input",
        ),
        (
            job("Failed", "BackoffLimitExceeded"),
            [pod("a", "1", 1), pod("b", "2", 137, "OOMKilled")],
            EXIT_OOM_KILLED,
            "b was OOMKilled (memory limit 3Gi)",
        ),
        (
            job("Failed", "DeadlineExceeded"),
            [pod("a", "1", 75)],
            EXIT_PREEMPTED,
            "ended while preempted",
        ),
        (
            job("Failed", "DeadlineExceeded"),
            [pod("a", "1", 137, disrupted=True)],
            EXIT_PREEMPTED,
            "disrupted: EvictionByEvictionAPI",
        ),
        (
            job("Failed", "BackoffLimitExceeded"),
            [pod("b", "2", 1), pod("a", "1", 137, "OOMKilled")],
            EXIT_FAILED,
            "b: trainer exited 1 (Error) (BackoffLimitExceeded)",
        ),
        (
            job("Failed", "DeadlineExceeded", "Job was active longer"),
            [],
            EXIT_FAILED,
            "failed: DeadlineExceeded: Job was active longer",
        ),
    ],
)
def test_training_outcome(the_job, pods, status, phrase):
    outcome = training_outcome(the_job, pods)
    assert outcome.exit_status == status
    assert phrase in outcome.summary


def test_failed_attempts_are_listed_oldest_first():
    outcome = training_outcome(
        job("Complete"),
        [pod("c", "3", 0, "Completed"), pod("b", "2", 1), pod("a", "1", 75)],
    )
    assert outcome.details == [
        "pod a: trainer exited 75 (Error)",
        "pod b: trainer exited 1 (Error)",
    ]
    assert outcome.summary == (
        "Job ns/j succeeded after 1 preemption(s), resumed from checkpoints and 1 failed attempt(s)"
    )


def test_progress_names_the_running_chief_and_why_it_waits():
    waiting = {
        "metadata": {"name": "new"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"waiting": {"reason": "ErrImagePull", "message": "no such image"}},
                }
            ],
        },
    }
    the_job = job("Running")
    assert job_progress(the_job, []) == "Job ns/j: no pod yet"
    assert job_progress(the_job, [pod("old", "1", 137), waiting]) == (
        "pod new: Pending (ErrImagePull: no such image)"
    )
