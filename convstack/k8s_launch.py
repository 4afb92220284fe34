"""`convstack k8s train` and `convstack k8s deploy`: run the k8s/ overlays on a cluster.

train: render the overlay, take its training Job (single-node, or the Indexed multi-worker one
with its headless Service), give it a unique name, the image and the trainer's arguments,
create it, stream the chief's log and report how it ended: success, failure (exit code and
reason, e.g. OOMKilled), bad input (exit 2, failed at once by the podFailurePolicy) or
preemption.

deploy: server-side apply the overlay's serving stack and wait until the Deployment is
available. models.config in the serving ConfigMap belongs to the rollout commands once it
exists: deploy creates it when absent and otherwise never applies the overlay's copy over it.

The decisions (which objects, what names, what a Job's and pods' status mean) are pure
functions of dicts, tested without a cluster; the I/O goes through serving.kube_api.
"""

from __future__ import annotations

import argparse
import copy
import logging
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import TextIO

from convstack import k8s_render
from serving.configmap_store import ROLLOUT_FIELD_MANAGER
from serving.kube_api import (
    APPLY_FIELD_MANAGER,
    KubeApi,
    KubeError,
    KubeInvalidError,
    KubeNotFoundError,
)

log = logging.getLogger(__name__)

# Exit statuses of both commands (also in their --help).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_OOM_KILLED = 4
EXIT_PREEMPTED = 5
EXIT_TIMEOUT = 6
EXIT_API_ERROR = 7
EXIT_INTERRUPTED = 130

# The trainer's exit codes (trainer/errors.py), which the Jobs' podFailurePolicy acts on.
TRAINER_BAD_INPUT = 2
TRAINER_PREEMPTED = 75
TRAINER_CONTAINER = "trainer"
MODELS_CONFIG_KEY = "models.config"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# A Job's name becomes a label value and, with "-<index>", each Indexed pod's hostname (both at
# most 63 characters); 52 leaves room for the index and kubelet suffixes.
MAX_JOB_NAME = 52
SHARED_KINDS = ("Namespace", "PersistentVolumeClaim")
DEFAULT_POLL_S = 5.0

EXIT_STATUS_HELP = f"""\
exit status:
  {EXIT_OK}  success (train: the Job completed, or was created with --no-follow;
     deploy: the Deployment is available)
  {EXIT_FAILED}  the Job failed (the trainer's exit code and reason are reported), or the
     Deployment exceeded its progress deadline
  {EXIT_USAGE}  bad usage (unknown overlay, bad flags)
  {EXIT_BAD_INPUT}  bad input: the trainer exited {TRAINER_BAD_INPUT}, and the podFailurePolicy
     failed the Job at once
  {EXIT_OOM_KILLED}  the trainer was OOMKilled (raise the memory limit or lower --batch-size)
  {EXIT_PREEMPTED}  the Job ended while its pod was preempted/evicted (DisruptionTarget or exit
     {TRAINER_PREEMPTED}); rerun with the same --run-dir to resume from the checkpoint
  {EXIT_TIMEOUT}  --timeout passed; the Job or rollout goes on in the cluster
  {EXIT_API_ERROR}  a Kubernetes API or rendering error (no cluster, forbidden, conflict, ...)
"""


class LaunchError(RuntimeError):
    """The overlay cannot be launched as asked; the message is one line."""


# -- choosing and preparing objects (pure) --------------------------------------------------


def component(obj: dict) -> str:
    return ((obj.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component", "")


def is_training(obj: dict) -> bool:
    """Training Jobs and the objects that exist only for them (multi-worker Service,
    tf-config ConfigMap)."""
    return obj["kind"] == "Job" or component(obj).startswith("training")


def serving_objects(objects: list[dict]) -> list[dict]:
    """What `deploy` applies: everything but training, the Namespace first."""
    chosen = [o for o in objects if not is_training(o)]
    return sorted(chosen, key=lambda o: o["kind"] != "Namespace")


def in_namespace(obj: dict, namespace: str) -> dict:
    """A copy of `obj` placed in `namespace` (a Namespace object is renamed to it)."""
    obj = copy.deepcopy(obj)
    if obj["kind"] == "Namespace":
        obj["metadata"]["name"] = namespace
    else:
        obj["metadata"]["namespace"] = namespace
    return obj


def overlay_namespace(objects: list[dict]) -> str:
    """The namespace the overlay puts its objects in."""
    for obj in objects:
        namespace = obj["metadata"].get("namespace")
        if namespace:
            return namespace
    raise LaunchError("the overlay sets no namespace; give --namespace")


def unique_job_name(prefix: str, now: datetime, token: str) -> str:
    """`prefix-YYYYmmdd-HHMMSS-token`; LaunchError when it would be too long for a Job."""
    name = f"{prefix}-{now:%Y%m%d-%H%M%S}-{token}"
    if len(name) > MAX_JOB_NAME:
        raise LaunchError(
            f"--name-prefix {prefix!r} is too long: the Job name {name!r} has {len(name)} "
            f"characters, at most {MAX_JOB_NAME} are allowed"
        )
    return name


def flag_names(args: list[str]) -> set[str]:
    return {a[2:].split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2}


def merge_trainer_args(base: list[str], extra: list[str]) -> list[str]:
    """The manifest's trainer args with `extra` appended; a flag given in `extra` replaces the
    manifest's (which are all `--flag=value`)."""
    given = flag_names(extra)
    return [a for a in base if not (a.startswith("--") and flag_names([a]) & given)] + extra


def container(workload: dict, name: str) -> dict:
    for candidate in workload["spec"]["template"]["spec"]["containers"]:
        if candidate["name"] == name:
            return candidate
    raise LaunchError(f"Job {workload['metadata']['name']} has no container {name!r}")


@dataclass
class TrainingPlan:
    """What `train` creates: the Job, its headless Service (multi-worker), and what they need
    that may not exist yet (Namespace, claims, the tf-config ConfigMap), all in `namespace`."""

    namespace: str
    job: dict
    service: dict | None
    prerequisites: list[dict]
    run_dir: str | None


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
    jobs = [o for o in objects if o["kind"] == "Job"]
    if len(jobs) != 1:
        raise LaunchError(f"expected one training Job in the overlay, found {len(jobs)}")
    job = in_namespace(jobs[0], namespace)
    job["metadata"]["name"] = name
    trainer = container(job, TRAINER_CONTAINER)
    trainer["image"] = image
    args = list(trainer.get("args") or [])
    run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("--run-dir=")), None)
    if run_dir is not None and "run-dir" not in flag_names(trainer_args):
        run_dir = str(PurePosixPath(run_dir).parent / name)
        args = merge_trainer_args(args, [f"--run-dir={run_dir}"])
    elif "run-dir" in flag_names(trainer_args):
        run_dir = None  # the user's own: they know it
    trainer["args"] = merge_trainer_args(args, trainer_args)
    service = _rename_worker_service(objects, job, namespace)
    prerequisites = [in_namespace(o, namespace) for o in objects if o["kind"] in SHARED_KINDS]
    prerequisites += [
        in_namespace(o, namespace) for o in _config_maps_used(objects, job) if is_training(o)
    ]
    prerequisites.sort(key=lambda o: o["kind"] != "Namespace")
    return TrainingPlan(namespace, job, service, prerequisites, run_dir)


def _rename_worker_service(objects: list[dict], job: dict, namespace: str) -> dict | None:
    """A multi-worker Job's pods find each other as <job>-<index>.<subdomain>, which a headless
    Service named <subdomain> provides; tf-config.sh builds TF_CONFIG from $JOB_NAME (the Job's
    own name, from the pod's label) and $SERVICE_NAME. One Service per Job, named like it and
    selecting only its pods, keeps those names right when several Jobs run at once."""
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
    for env in container(job, TRAINER_CONTAINER).get("env", []):
        if env["name"] == "SERVICE_NAME":
            env["value"] = name
    return service


def _config_maps_used(objects: list[dict], job: dict) -> list[dict]:
    names = {
        v["configMap"]["name"]
        for v in job["spec"]["template"]["spec"].get("volumes", [])
        if "configMap" in v
    }
    return [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] in names]


def owned_by(obj: dict, owner: dict) -> dict:
    """A copy of `obj` that Kubernetes deletes together with `owner` (garbage collection)."""
    obj = copy.deepcopy(obj)
    obj["metadata"]["ownerReferences"] = [
        {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
        }
    ]
    return obj


def chief_selector(job: dict) -> str:
    """Label selector of the pods whose log `train` follows: the Job's only pod, or index 0
    (the chief) of an Indexed Job."""
    selector = f"{JOB_NAME_LABEL}={job['metadata']['name']}"
    if job["spec"].get("completionMode") == "Indexed":
        selector += f",{INDEX_LABEL}=0"
    return selector


# -- reading Job and pod status (pure) ------------------------------------------------------


def _true_conditions(obj: dict) -> dict[str, dict]:
    return {
        c["type"]: c
        for c in (obj.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }


def job_finished(job: dict) -> str | None:
    """ "Complete", "Failed" or None while the Job runs."""
    conditions = _true_conditions(job)
    for state in ("Complete", "Failed"):
        if state in conditions:
            return state
    return None


def newest(pods: list[dict]) -> dict | None:
    return max(
        pods,
        key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]),
        default=None,
    )


def _trainer_status(pod: dict) -> dict:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == TRAINER_CONTAINER:
            return status
    return {}


def terminated_state(pod: dict) -> dict | None:
    return (_trainer_status(pod).get("state") or {}).get("terminated")


def pod_started(pod: dict) -> bool:
    """Whether the trainer container has started (so it has a log to read)."""
    state = _trainer_status(pod).get("state") or {}
    return "running" in state or "terminated" in state


def was_preempted(pod: dict) -> bool:
    """DisruptionTarget (preemption, eviction, drain) or the trainer's SIGTERM exit 75."""
    state = terminated_state(pod)
    return "DisruptionTarget" in _true_conditions(pod) or bool(
        state and state.get("exitCode") == TRAINER_PREEMPTED
    )


def pod_progress(pod: dict) -> str:
    """One line on where a pod is: phase, and why it waits (image pull, scheduling)."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    phase = status.get("phase", "Unknown")
    state = _trainer_status(pod).get("state") or {}
    if "waiting" in state:
        waiting = state["waiting"]
        detail = waiting.get("reason", "")
        if waiting.get("message"):
            detail += f": {waiting['message']}"
        return f"pod {name}: {phase} ({detail})" if detail else f"pod {name}: {phase}"
    for condition in status.get("conditions") or []:
        if condition["type"] == "PodScheduled" and condition.get("status") == "False":
            return f"pod {name}: {phase} (unschedulable: {condition.get('message', '')})"
    return f"pod {name}: {phase}"


@dataclass
class TrainingOutcome:
    exit_status: int
    summary: str
    details: list[str] = field(default_factory=list)


def describe_termination(pod: dict) -> str:
    state = terminated_state(pod) or {}
    text = f"pod {pod['metadata']['name']}: trainer exited {state.get('exitCode', '?')}"
    if state.get("reason"):
        text += f" ({state['reason']})"
    disruption = _true_conditions(pod).get("DisruptionTarget")
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
    failed = [p for p in pods if terminated_state(p) and terminated_state(p).get("exitCode") != 0]
    preempted = [p for p in failed if was_preempted(p)]
    details = [describe_termination(p) for p in sorted(failed, key=_creation)]
    state = job_finished(job)
    if state == "Complete":
        survived = (
            f" after {len(preempted)} preemption(s), resumed from checkpoints" if preempted else ""
        )
        retried = len(failed) - len(preempted)
        retries = f" and {retried} failed attempt(s)" if retried else ""
        return TrainingOutcome(EXIT_OK, f"{target} succeeded{survived}{retries}", details)
    condition = _true_conditions(job).get("Failed") or {}
    reason = condition.get("reason", "unknown reason")
    message = condition.get("message", "")
    why = f"{reason}: {message}" if message else reason
    last = newest(failed)
    last_state = terminated_state(last) if last else {}
    if reason == "PodFailurePolicy" and last_state.get("exitCode") == TRAINER_BAD_INPUT:
        return TrainingOutcome(
            EXIT_BAD_INPUT,
            f"{target} failed on bad input: the trainer exited {TRAINER_BAD_INPUT}, so the Job "
            f"was not retried ({why}); its log above says what was wrong",
            details,
        )
    if last is not None and last_state.get("reason") == "OOMKilled":
        limit = ((container_spec_of(last).get("resources") or {}).get("limits") or {}).get("memory")
        hint = f" (memory limit {limit})" if limit else ""
        return TrainingOutcome(
            EXIT_OOM_KILLED,
            f"{target} failed: {last['metadata']['name']} was OOMKilled{hint}, exit code "
            f"{last_state.get('exitCode')} ({why})",
            details,
        )
    if last is not None and was_preempted(last):
        return TrainingOutcome(
            EXIT_PREEMPTED,
            f"{target} ended while preempted: {describe_termination(last)} ({why}); rerun with "
            "the same --run-dir to resume from its checkpoint",
            details,
        )
    if last is not None:
        return TrainingOutcome(
            EXIT_FAILED,
            f"{target} failed: {describe_termination(last)} ({why})",
            details,
        )
    return TrainingOutcome(EXIT_FAILED, f"{target} failed: {why}", details)


def container_spec_of(pod: dict) -> dict:
    for candidate in (pod.get("spec") or {}).get("containers") or []:
        if candidate["name"] == TRAINER_CONTAINER:
            return candidate
    return {}


def _creation(pod: dict) -> tuple[str, str]:
    return pod["metadata"].get("creationTimestamp", ""), pod["metadata"]["name"]


# -- reading Deployment status (pure) -------------------------------------------------------


@dataclass(frozen=True)
class RolloutState:
    done: bool
    failed: bool
    message: str


def rollout_state(deployment: dict) -> RolloutState:
    """Where a Deployment's rollout is, as `kubectl rollout status` judges it."""
    metadata, spec = deployment["metadata"], deployment.get("spec") or {}
    status = deployment.get("status") or {}
    what = f"Deployment {metadata.get('namespace')}/{metadata['name']}"
    if metadata.get("generation", 0) > status.get("observedGeneration", -1):
        return RolloutState(False, False, f"{what}: waiting for the controller to see the update")
    progressing = next(
        (c for c in status.get("conditions") or [] if c["type"] == "Progressing"), {}
    )
    if progressing.get("reason") == "ProgressDeadlineExceeded":
        return RolloutState(
            True, True, f"{what} exceeded its progress deadline: {progressing.get('message', '')}"
        )
    desired = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    available = status.get("availableReplicas", 0)
    total = status.get("replicas", 0)
    if updated < desired:
        return RolloutState(False, False, f"{what}: {updated} of {desired} replicas updated")
    if total > updated:
        return RolloutState(False, False, f"{what}: {total - updated} old replica(s) terminating")
    if available < updated:
        return RolloutState(
            False, False, f"{what}: {available} of {updated} updated replicas available"
        )
    return RolloutState(True, False, f"{what} is available: {available}/{desired} replicas")


# -- the serving ConfigMap (pure) -----------------------------------------------------------


def holds_models_config(obj: dict) -> bool:
    return obj["kind"] == "ConfigMap" and MODELS_CONFIG_KEY in (obj.get("data") or {})


def without_models_config(config_map: dict) -> dict:
    """What deploy applies: every key but models.config, so that its field manager never owns
    that key (and so never removes or reverts it)."""
    config_map = copy.deepcopy(config_map)
    config_map["data"].pop(MODELS_CONFIG_KEY)
    return config_map


def field_owners(obj: dict, *path: str) -> list[str]:
    """The managers whose managedFields (FieldsV1) include `path`, e.g. data/models.config."""
    owners = []
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        node = entry.get("fieldsV1") or {}
        for key in path:
            node = node.get(f"f:{key}") if isinstance(node, dict) else None
            if node is None:
                break
        if node is not None:
            owners.append(entry.get("manager", "?"))
    return owners


# -- I/O: train -----------------------------------------------------------------------------


@dataclass
class Follow:
    """How `wait_for_job` waits: `timeout` seconds (None: as long as the Job runs), polling
    every `poll` seconds, log lines to `out`."""

    follow: bool = True
    timeout: float | None = None
    poll: float = DEFAULT_POLL_S
    out: TextIO = field(default_factory=lambda: sys.stdout)  # at call time (tests swap it)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


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
    selector = chief_selector(job)
    deadline = None if follow.timeout is None else follow.clock() + follow.timeout
    streamed: set[str] = set()
    last_progress = ""
    while True:
        current = api.get_job(namespace, name)
        chiefs = sorted(api.list_pods(namespace, selector), key=_creation)
        # Every attempt's log, in order (creation times have one-second resolution, so "the
        # newest pod" alone could skip a replacement).
        unread = [p for p in chiefs if pod_started(p) and p["metadata"]["name"] not in streamed]
        if follow.follow and unread:
            pod_name = unread[0]["metadata"]["name"]
            if _stream_log(api, namespace, pod_name, follow.out):
                streamed.add(pod_name)
                continue  # the pod has probably ended: look again at once
        running = [p for p in chiefs if terminated_state(p) is None]
        chief = (running or chiefs or [None])[-1]
        state = job_finished(current)
        if state is not None:
            pods = api.list_pods(namespace, f"{JOB_NAME_LABEL}={name}")
            return training_outcome(current, pods)
        progress = pod_progress(chief) if chief else f"Job {namespace}/{name}: no pod yet"
        if progress != last_progress:
            log.info("%s", progress)
            last_progress = progress
        if deadline is not None and follow.clock() >= deadline:
            return TrainingOutcome(
                EXIT_TIMEOUT,
                f"Job {namespace}/{name} still running after {follow.timeout:g} s ({progress}); "
                f"it goes on: kubectl -n {namespace} logs -f job/{name}",
            )
        follow.sleep(follow.poll)


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


def train(api: KubeApi, plan: TrainingPlan, follow: Follow) -> TrainingOutcome:
    job = launch_training(api, plan)
    run_dir = f", run directory {plan.run_dir}" if plan.run_dir else ""
    if not follow.follow:
        return TrainingOutcome(
            EXIT_OK,
            f"created Job {plan.namespace}/{job['metadata']['name']}{run_dir}; follow it with "
            f"kubectl -n {plan.namespace} logs -f job/{job['metadata']['name']}",
        )
    outcome = wait_for_job(api, job, follow)
    if run_dir and outcome.exit_status != EXIT_TIMEOUT:
        outcome.summary += run_dir
    return outcome


# -- I/O: deploy ----------------------------------------------------------------------------


def apply_serving(api: KubeApi, stack: list[dict]) -> list[str]:
    """Server-side apply `stack`; the models.config key is created, never re-applied. Returns
    notes on what was kept."""
    notes = []
    for obj in stack:
        if holds_models_config(obj):
            notes.append(_apply_serving_config(api, obj))
        else:
            api.apply(obj)
        log.info("applied %s", k8s_render.describe(obj))
    return notes


def _apply_serving_config(api: KubeApi, config_map: dict) -> str:
    namespace, name = config_map["metadata"]["namespace"], config_map["metadata"]["name"]
    what = f"ConfigMap {namespace}/{name}"
    try:
        existing = api.read_config_map(namespace, name)
    except KubeNotFoundError:
        existing = None
    if existing is None:
        # Created whole (TF Serving needs every key), models.config by the rollout manager.
        api.create(config_map, field_manager=ROLLOUT_FIELD_MANAGER)
        api.apply(without_models_config(config_map))
        return f"created {what} with the overlay's {MODELS_CONFIG_KEY}"
    applied = api.apply(without_models_config(config_map))
    current = (applied.get("data") or {}).get(MODELS_CONFIG_KEY)
    if current is None:
        seed = config_map["data"][MODELS_CONFIG_KEY]
        api.patch_config_map_data(
            namespace,
            name,
            {MODELS_CONFIG_KEY: seed},
            applied["metadata"]["resourceVersion"],
            field_manager=ROLLOUT_FIELD_MANAGER,
        )
        return f"{what} had no {MODELS_CONFIG_KEY}: wrote the overlay's"
    owners = [
        o for o in field_owners(applied, "data", MODELS_CONFIG_KEY) if o != APPLY_FIELD_MANAGER
    ]
    by = f", last written by {', '.join(owners)}" if owners else ""
    same = current == config_map["data"][MODELS_CONFIG_KEY]
    differs = "identical to the overlay's" if same else "differs from the overlay's, not reverted"
    return f"kept {MODELS_CONFIG_KEY} of {what} ({differs}{by})"


def wait_for_rollout(api: KubeApi, namespace: str, name: str, follow: Follow) -> tuple[int, str]:
    deadline = None if follow.timeout is None else follow.clock() + follow.timeout
    last = ""
    while True:
        state = rollout_state(api.get_deployment(namespace, name))
        if state.done:
            return (EXIT_FAILED if state.failed else EXIT_OK), state.message
        if state.message != last:
            log.info("%s", state.message)
            last = state.message
        if deadline is not None and follow.clock() >= deadline:
            return EXIT_TIMEOUT, (
                f"{state.message} after {follow.timeout:g} s. TF Serving is ready only once every "
                "model in models.config has a version: train one first (convstack k8s train)"
            )
        follow.sleep(follow.poll)


def deploy(api: KubeApi, objects: list[dict], namespace: str, follow: Follow) -> tuple[int, str]:
    stack = [in_namespace(o, namespace) for o in serving_objects(objects)]
    deployments = [o for o in stack if o["kind"] == "Deployment"]
    if len(deployments) != 1:
        raise LaunchError(
            f"expected one serving Deployment in the overlay, found {len(deployments)}"
        )
    for note in apply_serving(api, stack):
        print(note, file=follow.out)
    return wait_for_rollout(api, namespace, deployments[0]["metadata"]["name"], follow)


# -- command lines --------------------------------------------------------------------------


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overlay", required=True, help="overlay of k8s/overlays (local, gpu, multiworker)"
    )
    parser.add_argument("--namespace", help="namespace to use (default: the overlay's)")
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="stop waiting after S seconds (the work goes on in the cluster)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_POLL_S,
        metavar="S",
        help=f"seconds between status checks (default {DEFAULT_POLL_S:g})",
    )
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default $KUBECONFIG, ~/.kube/config, or the pod's service account)",
    )
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convstack k8s train",
        usage="convstack k8s train --overlay OVERLAY --image IMAGE [options] [-- TRAINER_FLAGS]",
        description="Create a uniquely named training Job from an overlay, stream the chief's "
        "log and report how it ended. Flags after `--` go to `convstack train` in the pod, "
        "replacing the manifest's flags of the same name. Each Job gets its own run directory "
        "(/runs/JOB_NAME) unless you pass --run-dir.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_flags(parser)
    parser.add_argument(
        "--image", required=True, help="the trainer image, e.g. registry/convstack-trainer:0.1.0"
    )
    parser.add_argument("--name-prefix", help="Job name prefix (default: the manifest's Job name)")
    parser.add_argument(
        "--no-follow", action="store_true", help="create the Job and return, without waiting"
    )
    return parser


def build_deploy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convstack k8s deploy",
        description="Server-side apply an overlay's serving stack (Namespace, claims, "
        "ConfigMap, Deployment, Services, PDB, HPA) and wait until the Deployment is available. "
        "An existing ConfigMap keeps its models.config (the rollout commands own it).",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_flags(parser)
    return parser


def _split_trainer_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def _run(prog: str, body: Callable[[], int]) -> int:
    """Run a command body: API and launch errors become one line on stderr."""
    from convstack.logs import configure_logging

    configure_logging()
    try:
        return body()
    except k8s_render.UnknownOverlayError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (KubeError, k8s_render.RenderError, LaunchError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_API_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; what was created goes on in the cluster", file=sys.stderr)
        return EXIT_INTERRUPTED


def train_main(argv: list[str]) -> int:
    """`convstack k8s train`; exit statuses in EXIT_STATUS_HELP."""
    own, trainer_args = _split_trainer_args(argv)
    args = build_train_parser().parse_args(own)

    def body() -> int:
        objects = k8s_render.render(args.overlay)
        namespace = args.namespace or overlay_namespace(objects)
        jobs = [o for o in objects if o["kind"] == "Job"]
        prefix = args.name_prefix or (jobs[0]["metadata"]["name"] if jobs else "convstack-train")
        name = unique_job_name(prefix, datetime.now(timezone.utc), secrets.token_hex(2))
        plan = plan_training(
            objects, name=name, image=args.image, trainer_args=trainer_args, namespace=namespace
        )
        api = KubeApi.from_config(args.kubeconfig, args.context)
        follow = Follow(follow=not args.no_follow, timeout=args.timeout, poll=args.poll_interval)
        outcome = train(api, plan, follow)
        for line in outcome.details:
            log.info("%s", line)
        print(outcome.summary)
        return outcome.exit_status

    return _run("convstack k8s train", body)


def deploy_main(argv: list[str]) -> int:
    """`convstack k8s deploy`; exit statuses in EXIT_STATUS_HELP."""
    args = build_deploy_parser().parse_args(argv)

    def body() -> int:
        objects = k8s_render.render(args.overlay)
        namespace = args.namespace or overlay_namespace(objects)
        api = KubeApi.from_config(args.kubeconfig, args.context)
        follow = Follow(timeout=args.timeout, poll=args.poll_interval)
        status, message = deploy(api, objects, namespace, follow)
        print(message)
        return status

    return _run("convstack k8s deploy", body)
