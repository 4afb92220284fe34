"""Which versions of a model to serve: the version directories on disk and the version policy.

Mirrors TF Serving's FileSystemStoragePathSource: versions are the all-digit child directories
of a model's base path, and `latest { num_versions }` (the default), `all {}` or
`specific { versions }` picks the aspired ones. Pure apart from listing one directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from tensorflow_serving.config import file_system_storage_path_source_pb2

ServableVersionPolicy = (
    file_system_storage_path_source_pb2.FileSystemStoragePathSourceConfig.ServableVersionPolicy
)

_DIGITS = re.compile(r"[0-9]+")
_MAX_VERSION = 2**63 - 1  # TF Serving parses versions as int64


def numeric_version_dirs(base_path: str | os.PathLike) -> dict[int, Path]:
    """Version -> directory for the all-digit child directories of `base_path` ("007" is 7).

    Files and other names (".export-3-x", "tmp") are ignored. When two names denote the same
    version, the one that sorts last wins ("7" over "007"), as in TF Serving, which walks the
    names in sorted order and keeps the last. Raises OSError (FileNotFoundError,
    NotADirectoryError, ...) when `base_path` cannot be listed.
    """
    base = Path(base_path)
    found: dict[int, Path] = {}
    for name in sorted(os.listdir(base)):
        if not _DIGITS.fullmatch(name) or not (base / name).is_dir():
            continue
        version = int(name)
        if version <= _MAX_VERSION:
            found[version] = base / name
    return found


def aspired_versions(available: Iterable[int], policy: ServableVersionPolicy) -> set[int]:
    """The versions among `available` that `policy` asks to serve.

    `latest` serves the `num_versions` highest (0 or unset means 1, as TF Serving reads it), `all`
    every one, `specific` those of its versions that are present.
    """
    versions = set(available)
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return versions
    if choice == "specific":
        return versions & set(policy.specific.versions)
    count = max(policy.latest.num_versions, 1) if choice == "latest" else 1
    return set(sorted(versions)[-count:]) if versions else set()
