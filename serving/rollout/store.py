"""Where `models.config` lives, for the rollout commands: a local file, a Kubernetes ConfigMap
or a server reached over gRPC (`--store file:PATH | configmap:NS/NAME[:KEY] | grpc:HOST:PORT`).

Every store reads a `StoredConfig` (the parsed config and an opaque revision) and writes with
optimistic concurrency: `write(config, expected_revision)` raises ConfigConflictError when the
stored config changed since it was read, and never overwrites that change. `update_config`
wraps the read-edit-validate-write cycle and retries a conflicting edit on the fresh config.
The revisions, the conflict errors, the retry loop and the file store itself live in
convstack.serving.config_file, which `convstack models-config` writes through too: one
compare-and-swap path for every writer of a models.config file.
"""

from __future__ import annotations

import os

from convstack.serving.config_file import (
    CONFLICT_BACKOFF_SECONDS,
    UPDATE_ATTEMPTS,
    ConfigConflictError,
    ConfigFile,
    ConfigStore,
    ConfigStoreError,
    Edit,
    StoredConfig,
    check_writable,
    locked,
    parse_stored,
    text_revision,
    update_config,
)

__all__ = [
    "CONFLICT_BACKOFF_SECONDS",
    "DEFAULT_CONFIGMAP_KEY",
    "UPDATE_ATTEMPTS",
    "ConfigConflictError",
    "ConfigStore",
    "ConfigStoreError",
    "Edit",
    "FileStore",
    "StoreAddressError",
    "StoredConfig",
    "check_writable",
    "locked",
    "open_store",
    "parse_configmap_address",
    "parse_stored",
    "text_revision",
    "update_config",
]

DEFAULT_CONFIGMAP_KEY = "models.config"


class StoreAddressError(ConfigStoreError, ValueError):
    """A --store value that names no store we know (a usage error)."""


class FileStore(ConfigFile):
    """`--store file:PATH`: the shared ConfigFile (atomic writes, content-hash revisions, the
    compare-and-swap under an flock on `.PATH.lock` beside it)."""


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
