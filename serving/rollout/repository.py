"""The versions of one model on disk, `<base_path>/<version>/`, as the rollout commands see
them: each version's model card (written by the trainer as assets.extra/model_card.json, read
here as plain JSON) and age, and the retirement of old versions.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convstack.serving.version_policy import numeric_version_dirs

MODEL_CARD = Path("assets.extra") / "model_card.json"


class RepositoryError(RuntimeError):
    """The model repository cannot be read or changed; one line naming the path."""


@dataclass(frozen=True)
class VersionOnDisk:
    """One exported version: where, when, and what its model card says (if it has one)."""

    version: int
    path: Path
    created: dt.datetime
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def test_metrics(self) -> dict[str, float]:
        return dict(self.card.get("test_metrics") or {})

    @property
    def dataset_uri(self) -> str | None:
        return (self.card.get("dataset") or {}).get("uri")

    def age(self, now: dt.datetime | None = None) -> dt.timedelta:
        return (now or dt.datetime.now(dt.timezone.utc)) - self.created


def read_card(version_dir: Path) -> dict[str, Any]:
    """The version's model card, {} when it has none; RepositoryError when it is not JSON."""
    path = version_dir / MODEL_CARD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepositoryError(f"{path}: unreadable model card: {exc}") from exc


def _created(version_dir: Path, card: dict[str, Any]) -> dt.datetime:
    try:
        created = dt.datetime.fromisoformat(card["created"])
        return created if created.tzinfo else created.replace(tzinfo=dt.timezone.utc)
    except (KeyError, TypeError, ValueError):
        return dt.datetime.fromtimestamp(version_dir.stat().st_mtime, dt.timezone.utc)


def _version_dirs(base_path: str | os.PathLike) -> dict[int, Path]:
    try:
        return numeric_version_dirs(base_path)
    except OSError as exc:
        raise RepositoryError(f"{base_path}: cannot list the model's versions: {exc}") from exc


def version_numbers(base_path: str | os.PathLike) -> list[int]:
    """The model's version numbers on disk, ascending (no model card is read)."""
    return sorted(_version_dirs(base_path))


def list_versions(base_path: str | os.PathLike) -> list[VersionOnDisk]:
    """The model's numeric version directories, oldest version number first."""
    versions = []
    for version, path in sorted(_version_dirs(base_path).items()):
        card = read_card(path)
        versions.append(VersionOnDisk(version, path, _created(path, card), card))
    return versions


def find_version(base_path: str | os.PathLike, version: int) -> VersionOnDisk:
    """One version; RepositoryError naming the base path when it is not there."""
    for found in list_versions(base_path):
        if found.version == version:
            return found
    raise RepositoryError(f"{base_path}: there is no version {version}")


def versions_to_retire(versions: Iterable[int], keep: int, protected: Iterable[int]) -> list[int]:
    """Versions that are neither among the `keep` newest nor `protected` (labelled or listed
    in the config), oldest first."""
    if keep < 0:
        raise ValueError(f"--keep must be >= 0, got {keep}")
    ordered = sorted(set(versions))
    newest = set(ordered[-keep:]) if keep else set()
    protected = set(protected)  # once: an iterator would be used up by the first version
    return [v for v in ordered if v not in newest and v not in protected]


def delete_version(version: VersionOnDisk) -> None:
    """Remove a version directory: first renamed to a hidden name (so a server polling the
    directory stops seeing the version at once and never sees half of it), then deleted."""
    hidden = version.path.with_name(f".retired-{version.version}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(version.path, hidden)
        shutil.rmtree(hidden)
    except OSError as exc:
        raise RepositoryError(f"{version.path}: cannot retire: {exc}") from exc
