"""The one conditional-write path of a `models.config` file, for every writer of it: the
`convstack models-config` command, and the rollout's `file:` and `grpc:` stores
(serving/rollout/store.py, which builds on this module: serving/ may not import rollouts).

A reader gets a `StoredConfig`: the parsed config and an opaque revision (the SHA-256 of the
text; ABSENT_REVISION for a file that does not exist yet). `ConfigFile.write(config,
expected_revision)` replaces the file only if it is still at that revision, comparing and
swapping under an flock on a hidden `.NAME.lock` beside it, and raises ConfigConflictError
(writing nothing) when another writer got there first. The replacement itself is atomic and
durable (convstack.common.files.write_atomic). `update_config` wraps read-edit-write and
retries a conflicting edit on the fresh config, so no writer ever loses another's edit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from convstack.serving import model_config
from convstack.serving.model_config import ModelConfigError, ModelServerConfig

log = logging.getLogger(__name__)

UPDATE_ATTEMPTS = 8
CONFLICT_BACKOFF_SECONDS = 0.05
# The revision of a file that does not exist: writing with it creates the file, and conflicts
# if someone else created it meanwhile. Not a hex digest, so no text can have it.
ABSENT_REVISION = "absent"


class ConfigStoreError(RuntimeError):
    """A config cannot be read or written; the message is one line naming where it is."""


class ConfigConflictError(ConfigStoreError):
    """The stored config changed between our read and our write; nothing was written."""


@dataclass(frozen=True)
class StoredConfig:
    """A config as stored, and the revision to pass back to `write` (hash, resourceVersion)."""

    config: ModelServerConfig
    revision: str


class ConfigStore(Protocol):
    """Reads and conditionally writes one models.config."""

    uri: str

    def read(self) -> StoredConfig: ...

    def write(self, config: ModelServerConfig, expected_revision: str) -> StoredConfig: ...


def check_writable(config: ModelServerConfig, uri: str) -> None:
    """ConfigStoreError naming the store unless `config` is valid (checked before any write)."""
    try:
        model_config.validate_model_config(config)
    except ModelConfigError as exc:
        raise ConfigStoreError(f"{uri}: refusing to write an invalid config: {exc}") from exc


def text_revision(text: str) -> str:
    """The revision of a config held as text: its SHA-256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_stored(text: str, uri: str) -> StoredConfig:
    """Parse and validate stored text; ConfigStoreError names `uri` and the problem."""
    try:
        config = model_config.parse_model_config(text, source=uri)
        model_config.validate_model_config(config)
    except ModelConfigError as exc:
        raise ConfigStoreError(str(exc) if str(exc).startswith(uri) else f"{uri}: {exc}") from exc
    return StoredConfig(config, text_revision(text))


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on `lock_path` (created if needed), so that two writers on this
    machine compare-and-swap one at a time."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class ConfigFile:
    """A models.config file that servers poll (`--model_config_file_poll_wait_seconds`).

    With `missing_ok`, a file that does not exist reads as an empty config at ABSENT_REVISION
    (so that an edit can create it); otherwise reading it is an error.
    """

    def __init__(self, path: str | os.PathLike, *, missing_ok: bool = False) -> None:
        self.path = Path(path).absolute()
        self.uri = f"file:{self.path}"
        self.missing_ok = missing_ok
        # Every writer of this path locks the same file, whichever class it goes through.
        self._lock_path = self.path.with_name(f".{self.path.name}.lock")

    def _read_text(self) -> str | None:
        """The file's text, or None when it does not exist."""
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigStoreError(f"{self.uri}: cannot read: {exc}") from exc

    def _missing(self) -> ConfigStoreError:
        return ConfigStoreError(f"{self.uri}: no such file")

    def read(self) -> StoredConfig:
        """The config and its revision; ConfigStoreError naming the file when it is unusable."""
        text = self._read_text()
        if text is not None:
            return parse_stored(text, self.uri)
        if self.missing_ok:
            return StoredConfig(ModelServerConfig(), ABSENT_REVISION)
        raise self._missing()

    def _current_revision(self, expected_revision: str) -> str:
        text = self._read_text()
        if text is not None:
            return text_revision(text)
        if expected_revision != ABSENT_REVISION:
            # Removed since it was read: an error, not a conflict to retry into creating it.
            raise self._missing()
        return ABSENT_REVISION

    def write(
        self,
        config: ModelServerConfig,
        expected_revision: str,
        before_replace: Callable[[ModelServerConfig], None] | None = None,
    ) -> StoredConfig:
        """Replace the file if it is still at `expected_revision` (ConfigConflictError if not);
        `before_replace` runs under the lock first (and stops the write by raising)."""
        # Checked before `before_replace`, which may push the config to a server.
        check_writable(config, self.uri)
        text = model_config.format_model_config(config)
        try:
            with locked(self._lock_path):
                if self._current_revision(expected_revision) != expected_revision:
                    raise ConfigConflictError(f"{self.uri}: changed since it was read; not written")
                if before_replace is not None:
                    before_replace(config)
                model_config.write_model_config(self.path, config)
        except OSError as exc:  # the lock or the temporary file (a read-only directory...)
            raise ConfigStoreError(f"{self.uri}: cannot write: {exc}") from exc
        return StoredConfig(config, text_revision(text))


Edit = Callable[[ModelServerConfig], ModelServerConfig]


def update_config(
    store: ConfigStore, edit: Edit, *, attempts: int = UPDATE_ATTEMPTS
) -> tuple[StoredConfig, StoredConfig]:
    """Read, apply `edit` (a pure function of the config; it may raise to refuse), validate
    and write; on a concurrent change, start again from the fresh config. Returns the config
    before and after. Raises ConfigConflictError after `attempts` conflicts in a row."""
    for attempt in range(1, attempts + 1):
        before = store.read()
        edited = edit(before.config)
        check_writable(edited, store.uri)
        try:
            return before, store.write(edited, before.revision)
        except ConfigConflictError:
            log.warning("%s changed while we edited it (attempt %d); retrying", store.uri, attempt)
            # Full jitter, so that two writers that collided do not collide again in step.
            time.sleep(random.uniform(0, CONFLICT_BACKOFF_SECONDS * attempt))
    raise ConfigConflictError(
        f"{store.uri}: changed concurrently {attempts} times in a row; gave up"
    )
