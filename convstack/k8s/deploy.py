"""`convstack k8s deploy`: server-side apply an overlay's serving stack and wait until the
Deployment is available.

models.config in the serving ConfigMap belongs to the rollout commands once it exists: deploy
creates it when absent and otherwise never applies the overlay's copy over it (its field manager
never owns that key, so a re-deploy neither removes nor reverts it).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from convstack.common.kube_api import APPLY_FIELD_MANAGER, KubeApi, KubeNotFoundError
from convstack.k8s import render
from convstack.k8s.errors import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, LaunchError
from convstack.k8s.objects import in_namespace, is_rollout, is_training, namespace_first
from convstack.k8s.waiting import Follow, wait_until
from convstack.serving.rollout.configmap_store import ROLLOUT_FIELD_MANAGER
from convstack.serving.rollout.store import DEFAULT_CONFIGMAP_KEY

log = logging.getLogger(__name__)

# The key the rollout commands' ConfigMap store edits.
MODELS_CONFIG_KEY = DEFAULT_CONFIGMAP_KEY


def deploy(api: KubeApi, objects: list[dict], namespace: str, follow: Follow) -> tuple[int, str]:
    """Apply the overlay's serving stack in `namespace` (notes on models.config to
    `follow.out`) and wait for its Deployment: (exit status, final message)."""
    stack, deployment = serving_stack(objects, namespace)
    for note in apply_serving(api, stack):
        print(note, file=follow.out)
    return wait_for_rollout(api, namespace, deployment, follow)


# -- choosing the objects (pure) ------------------------------------------------------------


def serving_objects(objects: list[dict]) -> list[dict]:
    """What `deploy` applies, the Namespace first: everything but training and the rollout Job
    template (the rollout's ServiceAccount, Role and RoleBinding are applied, so that
    `convstack k8s rollout` can run)."""
    return namespace_first([o for o in objects if not (is_training(o) or is_rollout_job(o))])


def is_rollout_job(obj: dict) -> bool:
    return is_rollout(obj) and obj["kind"] == "Job"


def serving_stack(objects: list[dict], namespace: str) -> tuple[list[dict], str]:
    """The serving objects placed in `namespace`, and the name of their one Deployment."""
    stack = [in_namespace(o, namespace) for o in serving_objects(objects)]
    deployments = [o for o in stack if o["kind"] == "Deployment"]
    if len(deployments) != 1:
        raise LaunchError(
            f"expected one serving Deployment in the overlay, found {len(deployments)}"
        )
    return stack, deployments[0]["metadata"]["name"]


# -- the serving ConfigMap's models.config --------------------------------------------------


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


def kept_models_config_note(what: str, applied: dict, overlay_text: str) -> str:
    """What deploy says when it left the models.config of `what` (as `applied`) as it was."""
    owners = [
        o for o in field_owners(applied, "data", MODELS_CONFIG_KEY) if o != APPLY_FIELD_MANAGER
    ]
    by = f", last written by {', '.join(owners)}" if owners else ""
    same = applied["data"][MODELS_CONFIG_KEY] == overlay_text
    differs = "identical to the overlay's" if same else "differs from the overlay's, not reverted"
    return f"kept {MODELS_CONFIG_KEY} of {what} ({differs}{by})"


def apply_serving(api: KubeApi, stack: list[dict]) -> list[str]:
    """Server-side apply `stack`; the models.config key is created, never re-applied. Returns
    notes on what was kept."""
    notes = []
    for obj in stack:
        if holds_models_config(obj):
            notes.append(_apply_serving_config(api, obj))
        else:
            api.apply(obj)
        log.info("applied %s", render.describe(obj))
    return notes


def _apply_serving_config(api: KubeApi, config_map: dict) -> str:
    namespace, name = config_map["metadata"]["namespace"], config_map["metadata"]["name"]
    what = f"ConfigMap {namespace}/{name}"
    overlay_text = config_map["data"][MODELS_CONFIG_KEY]
    if not _config_map_exists(api, namespace, name):
        # Created whole (TF Serving needs every key), models.config by the rollout manager.
        api.create(config_map, field_manager=ROLLOUT_FIELD_MANAGER)
        api.apply(without_models_config(config_map))
        return f"created {what} with the overlay's {MODELS_CONFIG_KEY}"
    applied = api.apply(without_models_config(config_map))
    if (applied.get("data") or {}).get(MODELS_CONFIG_KEY) is not None:
        return kept_models_config_note(what, applied, overlay_text)
    api.patch_config_map_data(
        namespace,
        name,
        {MODELS_CONFIG_KEY: overlay_text},
        applied["metadata"]["resourceVersion"],
        field_manager=ROLLOUT_FIELD_MANAGER,
    )
    return f"{what} had no {MODELS_CONFIG_KEY}: wrote the overlay's"


def _config_map_exists(api: KubeApi, namespace: str, name: str) -> bool:
    try:
        api.read_config_map(namespace, name)
    except KubeNotFoundError:
        return False
    return True


# -- waiting for the Deployment -------------------------------------------------------------


@dataclass(frozen=True)
class RolloutState:
    done: bool
    failed: bool
    message: str


def rollout_state(deployment: dict) -> RolloutState:
    """Where a Deployment's rollout is, as `kubectl rollout status` judges it."""
    metadata, status = deployment["metadata"], deployment.get("status") or {}
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
    return _replica_state(what, (deployment.get("spec") or {}).get("replicas", 1), status)


def _replica_state(what: str, desired: int, status: dict) -> RolloutState:
    """How far the replicas are: updated, old ones gone, updated ones available."""
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


def wait_for_rollout(api: KubeApi, namespace: str, name: str, follow: Follow) -> tuple[int, str]:
    """Poll Deployment `name` until its rollout is done or `follow.timeout` passes:
    (exit status, message)."""

    def check() -> tuple[tuple[int, str] | None, str]:
        state = rollout_state(api.get_deployment(namespace, name))
        if state.done:
            return ((EXIT_FAILED if state.failed else EXIT_OK), state.message), state.message
        return None, state.message

    result, progress = wait_until(follow, check)
    if result is not None:
        return result
    return EXIT_TIMEOUT, (
        f"{progress} after {follow.timeout:g} s. TF Serving is ready only once every "
        "model in models.config has a version: train one first (convstack k8s train)"
    )
