"""Queries over rendered Kubernetes objects (plain dicts), shared by the k8s tests."""

from __future__ import annotations

from pathlib import PurePosixPath

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The single object of `kind` (and `name`); fails the test if there are none or several."""
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def pod_template(workload: dict) -> dict:
    return workload["spec"]["template"]


def pod_spec(workload: dict) -> dict:
    return pod_template(workload)["spec"]


def all_containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(workload: dict, name: str) -> dict:
    found = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']} has no container {name!r}"
    return found[0]


def selects(selector: dict, labels: dict) -> bool:
    """Whether a LabelSelector (matchLabels and matchExpressions) selects `labels`."""
    if not selector:
        return False  # an empty selector would select everything; never what we want
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        present, values = key in labels, expression.get("values") or []
        matched = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels[key] not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not matched:
            return False
    return True


def service_selects(service: dict, labels: dict) -> bool:
    """A Service's selector is a plain map (matchLabels semantics)."""
    return selects({"matchLabels": service["spec"].get("selector") or {}}, labels)


def flags(args: list[str]) -> dict[str, str | bool]:
    """`--name=value` -> {"name": "value"}; a bare `--name` -> {"name": True}."""
    parsed: dict[str, str | bool] = {}
    for arg in args:
        assert arg.startswith("--"), f"expected --flag or --flag=value, got {arg!r}"
        name, sep, value = arg[2:].partition("=")
        parsed[name] = value if sep else True
    return parsed


def container_port(container: dict, port: int | str) -> int:
    """A probe's or Service's port (a number, or a port name of `container`) as a number."""
    if isinstance(port, int):
        assert any(p["containerPort"] == port for p in container.get("ports", [])), (
            f"{container['name']} exposes no port {port}"
        )
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"{container['name']} has no port named {port!r}"
    return named[0]


def mount_holding(container: dict, path: str) -> dict | None:
    """The volumeMount whose mountPath contains `path` (the deepest one), or None."""
    target = PurePosixPath(path)
    holding = [
        m
        for m in container.get("volumeMounts", [])
        if target == PurePosixPath(m["mountPath"])
        or PurePosixPath(m["mountPath"]) in target.parents
    ]
    return max(holding, key=lambda m: len(m["mountPath"]), default=None)


def volume(workload: dict, name: str) -> dict:
    found = [v for v in pod_spec(workload).get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']} has no volume {name!r}"
    return found[0]
