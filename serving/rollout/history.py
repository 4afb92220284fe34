"""The append-only rollout history of a model: one JSON line per change of its labels or
versions (who, when, what, from, to, gate results), in `<base_path>/rollout_history.jsonl`
next to the version directories (TF Serving ignores names that are not all digits).

Two kinds of record: a verb's (`action` canary, promote, run... with its outcome, ok or
failed), and a config write's (with a `step`: load, label or unload), written twice: outcome
`intent` before the write and `written` (or `not-written`) after it. A write whose intent has
no outcome was interrupted (the rollout was killed); the next verb on the model records the
outcome the config shows, marked as found after the interruption.

Lines are appended with O_APPEND under an flock and fsynced, so concurrent rollouts on one
machine never interleave or lose a record; nothing ever rewrites the file.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from convstack.serving.config_file import locked

HISTORY_FILE = "rollout_history.jsonl"


class HistoryError(RuntimeError):
    """The history cannot be read or appended; one line naming the file."""


def history_path(model_repository: str | os.PathLike) -> Path:
    return Path(model_repository) / HISTORY_FILE


def who() -> str:
    """user@host of this process, for the record."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def make_record(
    *,
    model: str,
    action: str,
    outcome: str,
    store: str,
    before: Mapping,
    after: Mapping,
    gates: list[Mapping[str, Any]] | None = None,
    detail: str = "",
    step: str | None = None,
) -> dict[str, Any]:
    """One history entry: `before`/`after` are {"versions": [...], "labels": {...}}; `step`
    names the config write of a step record."""
    step_field = {"step": step} if step is not None else {}
    return {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "who": who(),
        "model": model,
        "action": action,
        "outcome": outcome,
        "store": store,
        "from": dict(before),
        "to": dict(after),
        "gates": list(gates or []),
        "detail": detail,
        **step_field,
    }


def interrupted_write(records: list[dict[str, Any]], model: str) -> dict[str, Any] | None:
    """The intent of `model`'s last config write when no outcome followed it, else None."""
    steps = [r for r in records if r.get("model") == model and "step" in r]
    return steps[-1] if steps and steps[-1].get("outcome") == "intent" else None


def verb_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The verbs' records among `records` (the config writes' step records left out)."""
    return [record for record in records if "step" not in record]


def append_record(model_repository: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Append `record` as one JSON line, durably."""
    path = history_path(model_repository)
    line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")
    try:
        with locked(path.with_name(f".{HISTORY_FILE}.lock")):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as exc:
        raise HistoryError(f"{path}: cannot append the rollout record: {exc}") from exc
    return path


def read_history(model_repository: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record, oldest first ([] when there is none); a damaged line is reported by number."""
    path = history_path(model_repository)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise HistoryError(f"{path}: cannot read: {exc}") from exc
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise HistoryError(f"{path}:{number}: not a JSON record: {exc.msg}") from exc
    return records
