"""`convstack rollout status`: for one model, the versions on disk (with the model card's test
metrics and age), what each server replica reports, and the labels; as a table or JSON."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from convstack.serving.rollout import plan as rollout_plan
from convstack.serving.rollout.controller import Rollout
from convstack.serving.rollout.repository import RepositoryError
from convstack.serving.rollout.watch import expand_targets, observe

MISSING = "-"


def gather_status(rollout: Rollout, now: dt.datetime | None = None) -> dict[str, Any]:
    """The status as plain JSON."""
    now = now or dt.datetime.now(dt.timezone.utc)
    config = rollout.config()
    try:
        on_disk, repository_error = rollout.disk_versions(config), ""
    except RepositoryError as error:  # e.g. a ConfigMap store whose volume is not mounted here
        on_disk, repository_error = [], str(error)
    state = rollout_plan.model_state(config, rollout.model, [v.version for v in on_disk])
    labels_of: dict[int, list[str]] = {}
    for label, version in sorted(state.labels.items()):
        labels_of.setdefault(version, []).append(label)
    disk = [
        {
            "version": v.version,
            "created": v.created.isoformat(timespec="seconds"),
            "age_seconds": round(v.age(now).total_seconds()),
            "test_accuracy": v.test_metrics.get("accuracy"),
            "dataset": v.dataset_uri,
            "labels": labels_of.get(v.version, []),
            "in_config": v.version in state.versions,
        }
        for v in on_disk
    ]
    servers = [_server_status(t, rollout.model, state.labels) for t in _targets(rollout.servers)]
    warnings = [] if repository_error else missing_on_disk(state, [v.version for v in on_disk])
    return {
        "model": rollout.model,
        "store": rollout.store.uri,
        "repository": str(rollout.repository(config)),
        "config_versions": sorted(state.versions),
        "labels": dict(sorted(state.labels.items())),
        "versions": disk,
        "repository_error": repository_error,
        "servers": servers,
        "warnings": warnings,
    }


def missing_on_disk(state: rollout_plan.ModelState, on_disk: Sequence[int]) -> list[str]:
    """A warning for each labelled version whose directory is gone: servers keep serving it
    from memory, so nothing fails until a replica restarts and cannot load it."""
    present = set(on_disk)
    return [
        f"{label} version {version} is missing on disk; a replica restart will lose it"
        for label, version in sorted(state.labels.items(), key=_label_order)
        if version not in present
    ]


def _label_order(item: tuple[str, int]) -> tuple[int, str]:
    # stable first: it is the one serving the traffic
    label = item[0]
    order = rollout_plan.ROLLOUT_LABELS
    return (order.index(label) if label in order else len(order), label)


def _targets(servers: Sequence[str]) -> list[str]:
    try:
        return expand_targets(servers)
    except RuntimeError:
        return list(servers)  # shown with the error of each


def _server_status(target: str, model: str, labels) -> dict[str, Any]:
    try:
        view = observe(target, model, labels)
    except RuntimeError as error:
        return {"target": target, "error": str(error), "versions": {}, "labels": {}}
    return {
        "target": target,
        "error": view.error,
        "versions": {str(v): {"state": s, "error": e} for v, (s, e) in sorted(view.states.items())},
        "labels": dict(sorted(view.labels.items())),
    }


def format_age(seconds: float) -> str:
    """A short age: 45s, 12m, 5h, 3d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]


def format_status(status: dict[str, Any]) -> str:
    """A readable table of `gather_status`'s result."""
    labels = ", ".join(f"{k}={v}" for k, v in status["labels"].items()) or "none"
    lines = [
        f"model {status['model']}   store {status['store']}",
        f"repository {status['repository']}",
        f"labels: {labels}   config serves: {status['config_versions'] or 'by policy'}",
        "",
    ]
    rows = [
        [
            str(v["version"]),
            format_age(v["age_seconds"]),
            MISSING if v["test_accuracy"] is None else f"{v['test_accuracy']:.4f}",
            ",".join(v["labels"]) or MISSING,
            "yes" if v["in_config"] else "no",
        ]
        for v in status["versions"]
    ]
    if status.get("repository_error"):
        lines.append(f"versions on disk: not readable here ({status['repository_error']})")
    else:
        lines += _table(["VERSION", "AGE", "TEST ACC", "LABELS", "LOADED BY CONFIG"], rows)
    lines += [f"warning: {warning}" for warning in status.get("warnings", [])]
    if status["servers"]:
        lines.append("")
        server_rows = [_server_row(server) for server in status["servers"]]
        lines += _table(["SERVER", "VERSIONS", "LABELS"], server_rows)
    return "\n".join(lines)


def _server_row(server: dict[str, Any]) -> list[str]:
    if server["error"]:
        return [server["target"], f"error: {server['error']}", MISSING]
    versions = ", ".join(
        f"{v} {s['state']}" + (f" ({s['error']})" if s["error"] else "")
        for v, s in server["versions"].items()
    )
    labels = ", ".join(f"{k}->{v}" for k, v in server["labels"].items())
    return [server["target"], versions or "none", labels or MISSING]
