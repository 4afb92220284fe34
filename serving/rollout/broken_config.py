"""What a rollout can still learn from a models.config that does not parse (a broken hand
edit): the model's base_path, so that the failure is recorded in that model's history.

The text format is scanned, not parsed: each `config { ... }` entry of the list is cut out
at its `config {` opening, and its `name` and `base_path` string fields are read from it.
This is a best effort for a record, never a source of truth for a write.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

_ENTRY = re.compile(r"(?<![\w.])config\s*:?\s*\{")
_STRING_FIELD = r'\b{key}\s*:\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')'


def _field(entry: str, key: str) -> str | None:
    found = re.search(_STRING_FIELD.format(key=key), entry)
    if found is None:
        return None
    try:
        return ast.literal_eval(found.group(1))  # text format strings escape as Python's do
    except (ValueError, SyntaxError):
        return None


def base_path_in_text(text: str, model: str) -> Path | None:
    """The base_path of `model` in config text that may not parse; None if not found."""
    for entry in _ENTRY.split(text)[1:]:
        if _field(entry, "name") == model:
            base_path = _field(entry, "base_path")
            return Path(base_path) if base_path else None
    return None


def store_text(store: object) -> str | None:
    """The raw text of a store kept in a local file (file:, and grpc:'s mirror), else None."""
    path = getattr(store, "path", None) or getattr(getattr(store, "mirror", None), "path", None)
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def salvaged_base_path(store: object, model: str) -> Path | None:
    """`model`'s base_path from the store's text however broken, None when it cannot tell."""
    text = store_text(store)
    return base_path_in_text(text, model) if text is not None else None
