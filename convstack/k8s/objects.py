"""Pure queries and edits of rendered Kubernetes objects (plain dicts in the API's JSON shape),
shared by the `convstack k8s` commands."""

from __future__ import annotations

import copy
from datetime import datetime

from convstack.k8s.errors import LaunchError

# A Job's name becomes a label value and, with "-<index>", each Indexed pod's hostname (both at
# most 63 characters); 52 leaves room for the index and kubelet suffixes.
MAX_JOB_NAME = 52


def component(obj: dict) -> str:
    """The object's `app.kubernetes.io/component` label ("" when it has none)."""
    return ((obj.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component", "")


def is_rollout(obj: dict) -> bool:
    """The rollout Job template and its access (ServiceAccount, Role, RoleBinding)."""
    return component(obj).startswith("rollout")


def is_training(obj: dict) -> bool:
    """Training Jobs and the objects that exist only for them (multi-worker Service,
    tf-config ConfigMap)."""
    if is_rollout(obj):
        return False
    return obj["kind"] == "Job" or component(obj).startswith("training")


def namespace_first(objects: list[dict]) -> list[dict]:
    """`objects` with the Namespace first, since everything else is created inside it."""
    return sorted(objects, key=lambda o: o["kind"] != "Namespace")


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


def named_container(pod_spec: dict | None, name: str) -> dict | None:
    """The container `name` of a pod spec (a pod's `spec` or a workload's template's)."""
    for candidate in (pod_spec or {}).get("containers") or []:
        if candidate["name"] == name:
            return candidate
    return None


def true_conditions(obj: dict) -> dict[str, dict]:
    """The object's status conditions that hold, by type."""
    return {
        c["type"]: c
        for c in (obj.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }


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
    """The names of the `--flag` / `--flag=value` arguments in `args`."""
    return {a[2:].split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2}
