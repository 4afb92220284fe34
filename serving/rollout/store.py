"""Where `models.config` lives, for the rollout commands: a local file, a Kubernetes ConfigMap
or a server reached over gRPC (`--store file:PATH | configmap:NS/NAME[:KEY] | grpc:HOST:PORT`).

Every store reads a `StoredConfig` (the parsed config and an opaque revision) and writes with
optimistic concurrency: `write(config, expected_revision)` raises ConfigConflictError when the
stored config changed since it was read, and never overwrites that change. `update_config`
wraps the read-edit-validate-write cycle and retries a conflicting edit on the fresh config.
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

DEFAULT_CONFIGMAP_KEY = "models.config"
UPDATE_ATTEMPTS = 8
CONFLICT_BACKOFF_SECONDS = 0.05


class ConfigStoreError(RuntimeError):
    """A config store cannot be read or written; the message is one line naming the store."""


class ConfigConflictError(ConfigStoreError):
    """The stored config changed between our read and our write; nothing was written."""


class StoreAddressError(ConfigStoreError, ValueError):
    """A --store value that names no store we know (a usage error)."""


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


class FileStore:
    """A models.config file that servers poll (`--model_config_file_poll_wait_seconds`).

    Written atomically (temporary file, fsync, rename); the revision is the content's hash, and
    the compare-and-swap runs under an flock on `PATH.lock` beside it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).absolute()
        self.uri = f"file:{self.path}"
        self._lock_path = self.path.with_name(f".{self.path.name}.lock")

    def _read_text(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ConfigStoreError(f"{self.uri}: no such file") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigStoreError(f"{self.uri}: cannot read: {exc}") from exc

    def read(self) -> StoredConfig:
        return parse_stored(self._read_text(), self.uri)

    def write(
        self,
        config: ModelServerConfig,
        expected_revision: str,
        before_replace: Callable[[ModelServerConfig], None] | None = None,
    ) -> StoredConfig:
        """Replace the file if it is still at `expected_revision`; `before_replace` runs under
        the lock first (and stops the write by raising)."""
        # Checked before `before_replace`, which may push the config to a server.
        check_writable(config, self.uri)
        text = model_config.format_model_config(config)
        try:
            with locked(self._lock_path):
                current = text_revision(self._read_text())
                if current != expected_revision:
                    raise ConfigConflictError(f"{self.uri}: changed since it was read; not written")
                if before_replace is not None:
                    before_replace(config)
                model_config.write_model_config(self.path, config)
        except OSError as exc:  # the lock or the temporary file (a read-only directory...)
            raise ConfigStoreError(f"{self.uri}: cannot write: {exc}") from exc
        return StoredConfig(config, text_revision(text))


def open_store(uri: str, *, grpc_mirror: str | os.PathLike | None = None) -> ConfigStore:
    """The store named by `uri`: file:PATH, configmap:NAMESPACE/NAME[:KEY] or grpc:HOST:PORT.

    A grpc: store keeps the config it pushed in `grpc_mirror` (a file), because TF Serving's
    API can load a config but not return one.
    """
    scheme, _, rest = uri.partition(":")
    if scheme == "file" and rest:
        return FileStore(rest)
    if scheme == "configmap" and rest:
        namespace, name, key = parse_configmap_address(rest, uri)
        from convstack.serving.rollout.configmap_store import (
            ConfigMapStore,  # the kubernetes client, only here
        )

        return ConfigMapStore(namespace, name, key)
    if scheme == "grpc" and rest:
        from convstack.serving.rollout.grpc_store import GrpcConfigStore

        return GrpcConfigStore(rest, mirror=grpc_mirror)
    raise StoreAddressError(
        f"{uri!r}: not a config store; expected file:PATH, configmap:NAMESPACE/NAME[:KEY] "
        "or grpc:HOST:PORT"
    )


def parse_configmap_address(address: str, uri: str) -> tuple[str, str, str]:
    """NAMESPACE/NAME[:KEY] -> (namespace, name, key); ConfigStoreError naming `uri`."""
    location, _, key = address.partition(":")
    namespace, slash, name = location.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise StoreAddressError(f"{uri!r}: expected configmap:NAMESPACE/NAME[:KEY]")
    return namespace, name, key or DEFAULT_CONFIGMAP_KEY


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
