"""Real exported versions for the serving tests (not a test module).

The tiny classifier of tests/trainer/export_helpers.py is trained and exported once per test
process with trainer.export; every test then copies that version directory into its own model
base, as many times as it needs versions (a copy is a few small files).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from convstack.serving import model_config

MODEL_NAME = "tiny"
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
# Waits for background loads; generous because CI machines are slow, never asserted on.
WAIT_SECONDS = 120.0
_export_lock = threading.Lock()


@functools.cache
def exported_version() -> Path:
    """A version directory of the tiny model exported by trainer.export (shared, read-only)."""
    from convstack.trainer.export import export_version
    from tests.trainer import export_helpers

    with _export_lock:
        root = Path(tempfile.mkdtemp(prefix="convstack-serving-tests-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        result = export_version(
            export_helpers.trained_model(),
            **export_helpers.export_kwargs(root, model_name=MODEL_NAME, version=1),
        )
        return result.path


def add_version(model_dir: Path, version: int, name: str | None = None) -> Path:
    """Copy the exported version into `model_dir` as `version` (or as directory `name`)."""
    target = Path(model_dir) / (name or str(version))
    shutil.copytree(exported_version(), target)
    return target


def add_corrupt_version(model_dir: Path, version: int) -> Path:
    """A version directory whose saved_model.pb is garbage."""
    target = add_version(model_dir, version)
    (target / "saved_model.pb").write_bytes(b"\x00 this is not a SavedModel proto")
    return target


def make_model_dir(root: Path, versions=(1,), name: str = MODEL_NAME) -> Path:
    """`root/name/` holding copies of the exported version as `versions`."""
    return make_repository(root, exported_version(), versions, name)


def make_repository(root: Path, source: Path, versions, name: str = MODEL_NAME) -> Path:
    """`root/name/` holding copies of the version directory `source` as `versions` (responses
    tell the copies apart by their model_spec.version)."""
    model_dir = Path(root) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    for version in versions:
        shutil.copytree(source, model_dir / str(version))
    return model_dir


def config_for(model_dir: Path, name: str = MODEL_NAME, **policy) -> model_config.ModelServerConfig:
    """A one-model config for `model_dir` (policy keywords as model_config.add_model)."""
    return model_config.add_model(model_config.ModelServerConfig(), name, model_dir, **policy)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    """Poll `condition` until it holds; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def states(manager, name: str = MODEL_NAME) -> dict[int, str]:
    """version -> state name of every version the manager reports for `name`."""
    return {status.version: status.state.name for status in manager.model_status(name)}


class EventLog:
    """Collects a manager's on_event lines (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._lines: list[str] = []

    def __call__(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def index(self, fragment: str) -> int:
        """Index of the first line containing `fragment`; AssertionError if none does."""
        for index, line in enumerate(self.lines):
            if fragment in line:
                return index
        raise AssertionError(f"no event contains {fragment!r}; events: {self.lines}")

    def count(self, fragment: str) -> int:
        return sum(fragment in line for line in self.lines)
