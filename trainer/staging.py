"""The hidden staging directories of exports (`<model_dir>/.export-<version>-<random>`), and
removing the ones killed exporters left behind without touching a live exporter's.

Every exporter holds a shared flock on the model directory while it stages there. One that can
take the lock exclusively knows that no export is live in that directory, so every staging
directory in it is stale. flock covers the processes of one machine (and NFS clients only
where the mount forwards locks): with exporters on several machines sharing one model
directory, a remote live exporter's staging could look stale, so export from one machine at a
time there (in a training Job only the chief exports).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = ".export-"


@contextlib.contextmanager
def staging_lock(model_dir: Path) -> Iterator[None]:
    """Hold a shared flock on `model_dir` while staging there, after removing the staging
    directories of dead exporters if no live one holds the lock.

    The lock is on the directory itself, so it leaves no file behind; the kernel drops it when
    its holder dies, however it dies, so a held lock always means a live exporter.
    """
    fd = os.open(model_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another export is live: its staging is not stale; a later export cleans
        else:
            remove_stale_staging(model_dir)
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_stale_staging(model_dir: Path) -> list[str]:
    """Remove every hidden staging directory in `model_dir`; call only with its exclusive
    staging lock held (so none belongs to a live exporter). Returns the names removed."""
    removed = []
    for child in sorted(Path(model_dir).iterdir()):
        if child.name.startswith(PREFIX) and child.is_dir():
            logger.info("Removing %s, left by an export that did not finish", child)
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed
