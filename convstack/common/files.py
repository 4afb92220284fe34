"""Atomic, durable file writes: one rule for every file convstack publishes.

The rule: the content goes to a temporary name beside the target (a dot name, so TF Serving,
`*.tfrecord` globs and version scans never see it), is flushed and fsynced, is renamed over the
target, and then the directory is fsynced so that the rename itself survives a crash. A reader
sees the old file or the new one, never half of one; a failed write leaves the target as it was
and removes its temporary file.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

# The mode of a new file (an existing one keeps its own): readable by a server running as
# another user, as a config or a model card must be.
NEW_FILE_MODE = 0o644


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh name beside `path` for writing it (hidden, unique to this process and call)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file and directory below `directory`, before it is renamed into place: after
    a crash the renamed tree must not point at data that never reached the disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def publish(temporary: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make a fully written `temporary` the file at `path`: fsync it, rename it over `path`,
    fsync the directory."""
    fsync_path(temporary)
    os.replace(temporary, path)
    fsync_path(Path(path).parent)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` with `data` (text is written as UTF-8) by the rule above; the file keeps
    its mode, a new one gets NEW_FILE_MODE."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    mode = path.stat().st_mode & 0o777 if path.exists() else NEW_FILE_MODE
    temporary = temporary_path(path)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(temporary, mode)  # not through open(): the umask would change it
        publish(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any, *, sort_keys: bool = True) -> None:
    """`data` as indented JSON at `path` (its directory created if missing), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
