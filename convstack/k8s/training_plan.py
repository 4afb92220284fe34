"""What `convstack k8s train` creates, decided without a cluster: the overlay's training Job
under a unique name with the image and the trainer's arguments, its own run directory, the
multi-worker headless Service renamed to match it (so TF_CONFIG names the right pods), and the
objects the Job needs that may not exist yet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from convstack.k8s.errors import LaunchError
from convstack.k8s.job_status import JOB_NAME_LABEL, job_selector
from convstack.k8s.objects import (
    flag_names,
    in_namespace,
    is_training,
    named_container,
    namespace_first,
)

TRAINER_CONTAINER = "trainer"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
DEFAULT_NAME_PREFIX = "convstack-train"
# Objects training shares with serving; created if absent, never owned by one Job.
SHARED_KINDS = ("Namespace", "PersistentVolumeClaim")


@dataclass
class TrainingPlan:
    """What `train` creates: the Job, its headless Service (multi-worker), and what they need
    that may not exist yet (Namespace, claims, the tf-config ConfigMap), all in `namespace`."""

    namespace: str
    job: dict
    service: dict | None
    prerequisites: list[dict]
    run_dir: str | None


def default_name_prefix(objects: list[dict]) -> str:
    """The Job name prefix when none is given: the overlay's Job's name."""
    jobs = _jobs(objects)
    return jobs[0]["metadata"]["name"] if jobs else DEFAULT_NAME_PREFIX


def merge_trainer_args(base: list[str], extra: list[str]) -> list[str]:
    """The manifest's trainer args with `extra` appended; a flag given in `extra` replaces the
    manifest's (which are all `--flag=value`)."""
    given = flag_names(extra)
    return [a for a in base if not (a.startswith("--") and flag_names([a]) & given)] + extra


def trainer_container(job: dict) -> dict:
    """The Job's trainer container; LaunchError when it has none."""
    found = named_container(job["spec"]["template"]["spec"], TRAINER_CONTAINER)
    if found is None:
        raise LaunchError(f"Job {job['metadata']['name']} has no container {TRAINER_CONTAINER!r}")
    return found


def plan_training(
    objects: list[dict],
    *,
    name: str,
    image: str,
    trainer_args: list[str],
    namespace: str,
) -> TrainingPlan:
    """The overlay's one training Job, renamed `name`, running `image` with `trainer_args`
    appended; its run directory is /runs/<name> unless the args set --run-dir, so that Jobs
    never share (and resume from) each other's checkpoints."""
    jobs = _jobs(objects)
    if len(jobs) != 1:
        raise LaunchError(f"expected one training Job in the overlay, found {len(jobs)}")
    job = in_namespace(jobs[0], namespace)
    job["metadata"]["name"] = name
    trainer = trainer_container(job)
    trainer["image"] = image
    args, run_dir = _own_run_dir(list(trainer.get("args") or []), name, trainer_args)
    trainer["args"] = merge_trainer_args(args, trainer_args)
    service = _rename_worker_service(objects, job, namespace)
    return TrainingPlan(namespace, job, service, _prerequisites(objects, job, namespace), run_dir)


def _jobs(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] == "Job" and is_training(o)]


def _own_run_dir(
    args: list[str], name: str, trainer_args: list[str]
) -> tuple[list[str], str | None]:
    """The manifest's args with its --run-dir moved to a sibling named `name`, and that
    directory; None (args unchanged) when the user gives --run-dir or the manifest has none."""
    if "run-dir" in flag_names(trainer_args):
        return args, None  # the user's own: they know it
    manifest_dir = next((a.split("=", 1)[1] for a in args if a.startswith("--run-dir=")), None)
    if manifest_dir is None:
        return args, None
    run_dir = str(PurePosixPath(manifest_dir).parent / name)
    return merge_trainer_args(args, [f"--run-dir={run_dir}"]), run_dir


def _rename_worker_service(objects: list[dict], job: dict, namespace: str) -> dict | None:
    """A multi-worker Job's pods find each other as <job>-<index>.<subdomain>, which a headless
    Service named <subdomain> provides; tf-config.sh builds TF_CONFIG from $JOB_NAME (the Job's
    own name, from the pod's label) and $SERVICE_NAME. One Service per Job, named like it and
    selecting only its pods, keeps those names right when several Jobs run at once. Points
    `job`'s subdomain and SERVICE_NAME at the renamed Service it returns."""
    pod_spec = job["spec"]["template"]["spec"]
    subdomain = pod_spec.get("subdomain")
    if not subdomain:
        return None
    services = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == subdomain]
    if len(services) != 1:
        raise LaunchError(
            f"the Job's pods use subdomain {subdomain!r} but the overlay has no "
            "Service of that name"
        )
    name = job["metadata"]["name"]
    service = in_namespace(services[0], namespace)
    service["metadata"]["name"] = name
    service["spec"]["selector"] = {**service["spec"].get("selector", {}), JOB_NAME_LABEL: name}
    pod_spec["subdomain"] = name
    for env in trainer_container(job).get("env", []):
        if env["name"] == "SERVICE_NAME":
            env["value"] = name
    return service


def _prerequisites(objects: list[dict], job: dict, namespace: str) -> list[dict]:
    """The shared objects, and the training-only ConfigMaps the Job mounts, in `namespace`."""
    shared = [o for o in objects if o["kind"] in SHARED_KINDS]
    own = [o for o in _config_maps_used(objects, job) if is_training(o)]
    return namespace_first([in_namespace(o, namespace) for o in shared + own])


def _config_maps_used(objects: list[dict], job: dict) -> list[dict]:
    names = {
        v["configMap"]["name"]
        for v in job["spec"]["template"]["spec"].get("volumes", [])
        if "configMap" in v
    }
    return [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] in names]


def chief_selector(job: dict) -> str:
    """Label selector of the pods whose log `train` follows: the Job's only pod, or index 0
    (the chief) of an Indexed Job."""
    selector = job_selector(job["metadata"]["name"])
    if job["spec"].get("completionMode") == "Indexed":
        selector += f",{INDEX_LABEL}=0"
    return selector
