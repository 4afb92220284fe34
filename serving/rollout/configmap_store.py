"""`configmap:NAMESPACE/NAME[:KEY]`: models.config kept in the ConfigMap the TF Serving
Deployment mounts (k8s/base/serving), edited through the Kubernetes API.

The revision is the ConfigMap's `metadata.resourceVersion`. A write is a JSON merge patch that
sets only KEY and carries that resourceVersion as a precondition, so the API server refuses it
(409, ConfigConflictError) if anyone changed the ConfigMap since it was read: a concurrent edit
is never overwritten, and the other keys (batching, monitoring) are never touched. Writes use
the field manager `convstack-rollout`, which `convstack k8s deploy` leaves alone, so a
re-deploy does not revert a rollout.
"""

from __future__ import annotations

from collections.abc import Callable

from convstack.common.kube_api import KubeApi, KubeConflictError, KubeError, KubeNotFoundError
from convstack.serving import model_config
from convstack.serving.model_config import ModelServerConfig
from convstack.serving.rollout.store import (
    DEFAULT_CONFIGMAP_KEY,
    ConfigConflictError,
    ConfigStoreError,
    StoredConfig,
    check_writable,
    parse_stored,
)

__all__ = ["ROLLOUT_FIELD_MANAGER", "ConfigMapStore"]

# The field manager of models.config edits; `convstack k8s deploy` seeds the key with it too.
ROLLOUT_FIELD_MANAGER = "convstack-rollout"


class ConfigMapStore:
    """models.config as key `key` of ConfigMap `namespace/name` (ConfigStore protocol).

    `api` defaults to a KubeApi built from the kubeconfig ($KUBECONFIG, ~/.kube/config) or, in
    a pod, the service account; it is created on first use.
    """

    def __init__(
        self,
        namespace: str,
        name: str,
        key: str = DEFAULT_CONFIGMAP_KEY,
        api: KubeApi | None = None,
    ) -> None:
        self.namespace, self.name, self.key = namespace, name, key
        self.uri = f"configmap:{namespace}/{name}:{key}"
        self._api = api

    @property
    def api(self) -> KubeApi:
        if self._api is None:
            try:
                self._api = KubeApi.from_config()
            except KubeError as exc:
                raise ConfigStoreError(f"{self.uri}: {exc}") from exc
        return self._api

    def read(self) -> StoredConfig:
        """The parsed config and the ConfigMap's resourceVersion."""
        text, revision = self._read_text()
        return StoredConfig(parse_stored(text, self.uri).config, revision)

    def write(
        self,
        config: ModelServerConfig,
        expected_revision: str,
        before_replace: Callable[[ModelServerConfig], None] | None = None,
    ) -> StoredConfig:
        """Set the key to `config` if the ConfigMap is still at `expected_revision`
        (ConfigConflictError otherwise, and nothing is written). `before_replace` runs just
        before the write and stops it by raising (as FileStore's)."""
        check_writable(config, self.uri)
        text = model_config.format_model_config(config)
        if before_replace is not None:
            before_replace(config)
        try:
            answer = self.api.patch_config_map_data(
                self.namespace,
                self.name,
                {self.key: text},
                expected_revision,
                field_manager=ROLLOUT_FIELD_MANAGER,
            )
        except KubeConflictError as exc:
            raise ConfigConflictError(
                f"{self.uri}: changed since it was read (resourceVersion {expected_revision} is "
                "stale); not written"
            ) from exc
        except KubeNotFoundError as exc:
            raise ConfigStoreError(f"{self.uri}: {self._missing_map()}") from exc
        except KubeError as exc:
            raise ConfigStoreError(f"{self.uri}: {exc}") from exc
        return StoredConfig(config, answer["metadata"]["resourceVersion"])

    def _read_text(self) -> tuple[str, str]:
        try:
            config_map = self.api.read_config_map(self.namespace, self.name)
        except KubeNotFoundError as exc:
            raise ConfigStoreError(f"{self.uri}: {self._missing_map()}") from exc
        except KubeError as exc:
            raise ConfigStoreError(f"{self.uri}: {exc}") from exc
        data = config_map.get("data") or {}
        if self.key not in data:
            present = ", ".join(sorted(data)) or "none"
            raise ConfigStoreError(
                f"{self.uri}: ConfigMap {self.namespace}/{self.name} has no key {self.key!r} "
                f"(keys: {present})"
            )
        return data[self.key], config_map["metadata"]["resourceVersion"]

    def _missing_map(self) -> str:
        return (
            f"no ConfigMap {self.name!r} in namespace {self.namespace!r} (or no such namespace) "
            f"to hold key {self.key!r}; deploy the serving stack first (convstack k8s deploy)"
        )
