"""`convstack k8s train` on the cluster: create a planned training Job (with what it needs),
stream its chief pod's log, wait until it finishes and read how it ended."""

from __future__ import annotations

import logging

from convstack.common.kube_api import KubeApi, KubeError
from convstack.k8s import job_follow, render
from convstack.k8s.errors import EXIT_OK, EXIT_TIMEOUT
from convstack.k8s.job_follow import JobWatch, logs_command
from convstack.k8s.objects import owned_by
from convstack.k8s.training_plan import TRAINER_CONTAINER, TrainingPlan, chief_selector
from convstack.k8s.training_status import TrainingOutcome, training_outcome
from convstack.k8s.waiting import Follow

log = logging.getLogger(__name__)

# Training follows the chief's trainer container (index 0 of a multi-worker Job).
TRAINING_WATCH = JobWatch(TRAINER_CONTAINER, chief_selector, training_outcome)


def train(api: KubeApi, plan: TrainingPlan, follow: Follow) -> TrainingOutcome:
    """Launch the plan and, unless `follow.follow` is off, wait for the Job's outcome."""
    job = launch_training(api, plan)
    name = job["metadata"]["name"]
    run_dir = f", run directory {plan.run_dir}" if plan.run_dir else ""
    if not follow.follow:
        return TrainingOutcome(
            EXIT_OK,
            f"created Job {plan.namespace}/{name}{run_dir}; follow it with "
            f"{logs_command(plan.namespace, name)}",
        )
    outcome = wait_for_job(api, job, follow)
    if run_dir and outcome.exit_status != EXIT_TIMEOUT:
        outcome.summary += run_dir
    return outcome


def launch_training(api: KubeApi, plan: TrainingPlan) -> dict:
    """Create the prerequisites (server-side apply), the Job, and its Service owned by it."""
    for obj in plan.prerequisites:
        api.apply(obj)
        log.info("applied %s", render.describe(obj))
    job = api.create_job(plan.namespace, plan.job)
    log.info("created %s", render.describe(job))
    if plan.service is not None:
        try:
            service = api.create(owned_by(plan.service, job))
        except KubeError:
            # Without its Service the workers cannot find each other: do not leave it running.
            api.delete("Job", plan.namespace, job["metadata"]["name"])
            raise
        log.info("created %s", render.describe(service))
    return job


def wait_for_job(api: KubeApi, job: dict, follow: Follow) -> TrainingOutcome:
    """Follow the chief pod's log (each attempt's), until the Job finishes or time runs out."""
    return job_follow.wait_for_job(api, job, follow, TRAINING_WATCH)
