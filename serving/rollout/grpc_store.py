"""`--store grpc:HOST:PORT`: push models.config to a running server with ModelService's
HandleReloadConfigRequest, which TF Serving and the embedded server both answer.

TF Serving can load a config over gRPC but has no call that returns one, so the store keeps
what it pushed in a local mirror file (by default under $XDG_STATE_HOME/convstack) and reads
that; seed the mirror with the config the server started from (`--grpc-mirror FILE`). A write
first pushes, and replaces the mirror only when the server accepted the config.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from convstack.client.errors import PredictionError
from convstack.client.sync_client import PredictionClient
from convstack.serving.model_config import ModelServerConfig
from convstack.serving.rollout.store import (
    ConfigStoreError,
    FileStore,
    StoreAddressError,
    StoredConfig,
)

RELOAD_TIMEOUT_SECONDS = 60.0


def default_mirror(target: str) -> Path:
    """Where the config pushed to `target` is kept when no mirror is given."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return (
        state / "convstack" / "grpc-configs" / (re.sub(r"[^A-Za-z0-9.-]", "_", target) + ".config")
    )


class GrpcConfigStore:
    """The config of the server at `target` (HOST:PORT), mirrored in a local file."""

    def __init__(self, target: str, mirror: str | os.PathLike | None = None) -> None:
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise StoreAddressError(f"'grpc:{target}': expected grpc:HOST:PORT")
        self.target = target
        self.uri = f"grpc:{target}"
        self.mirror = FileStore(mirror if mirror is not None else default_mirror(target))

    def read(self) -> StoredConfig:
        if not self.mirror.path.exists():
            raise ConfigStoreError(
                f"{self.uri}: no config pushed from here yet and no mirror at {self.mirror.path}; "
                "pass --grpc-mirror FILE holding the config the server runs"
            )
        return self.mirror.read()

    def write(self, config: ModelServerConfig, expected_revision: str) -> StoredConfig:
        return self.mirror.write(config, expected_revision, before_replace=self._push)

    def _push(self, config: ModelServerConfig) -> None:
        # Any model name works: HandleReloadConfigRequest is not about one model.
        with PredictionClient(
            self.target, "_", timeout=RELOAD_TIMEOUT_SECONDS, retries=1
        ) as client:
            try:
                client.reload_config(config)
            except PredictionError as error:
                raise ConfigStoreError(
                    f"{self.uri}: the server refused the config: {error}"
                ) from error
