"""The `configmap:` config store against a stand-in Kubernetes API server (the real
`kubernetes` client over loopback HTTP, every object schema-validated), and against a real
cluster when KUBECONFIG is set (`pytest -m cluster`)."""

from __future__ import annotations

import os
import uuid

import pytest

from convstack.common.kube_api import KubeApi
from convstack.serving import model_config
from convstack.serving.rollout.configmap_store import ROLLOUT_FIELD_MANAGER, ConfigMapStore
from convstack.serving.rollout.store import ConfigConflictError, ConfigStoreError, open_store
from tests.k8s.apiserver import FakeApiServer

NAMESPACE = "convstack"
NAME = "convstack-serving-config"
BATCHING = "max_batch_size { value: 32 }\n"
MONITORING = 'prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }\n'


def initial_config() -> model_config.ModelServerConfig:
    return model_config.single_model_config("digits", "/models/digits")


def config_map(models_config: str | None = None) -> dict:
    data = {"batching.config": BATCHING, "monitoring.config": MONITORING}
    if models_config is not None:
        data["models.config"] = models_config
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {"app": "convstack"}},
        "data": data,
    }


@pytest.fixture
def server():
    with FakeApiServer() as server:
        yield server
        assert server.invalid == [], "the store sent objects that are invalid for Kubernetes"
        assert server.errors == []


@pytest.fixture
def api(server, tmp_path) -> KubeApi:
    return KubeApi.from_config(str(server.write_kubeconfig(tmp_path / "kubeconfig")))


@pytest.fixture
def store(server, api) -> ConfigMapStore:
    server.seed(config_map(model_config.format_model_config(initial_config())), manager="kubectl")
    return ConfigMapStore(NAMESPACE, NAME, api=api)


def canary(config):
    config = model_config.set_version_policy(config, "digits", specific=[1, 2])
    return model_config.set_version_labels(config, "digits", {"stable": 1, "canary": 2})


def test_read_returns_the_config_and_the_resource_version(server, store):
    stored = store.read()
    assert stored.config == initial_config()
    assert (
        stored.revision == server.get("ConfigMap", NAMESPACE, NAME)["metadata"]["resourceVersion"]
    )
    assert store.uri == f"configmap:{NAMESPACE}/{NAME}:models.config"


def test_write_round_trips_and_changes_only_the_key(server, store):
    before = store.read()
    written = store.write(canary(before.config), before.revision)

    stored = server.get("ConfigMap", NAMESPACE, NAME)
    assert written.revision == stored["metadata"]["resourceVersion"] != before.revision
    assert stored["data"]["models.config"] == model_config.format_model_config(
        canary(initial_config())
    )
    assert stored["data"]["batching.config"] == BATCHING
    assert stored["data"]["monitoring.config"] == MONITORING
    assert stored["metadata"]["labels"] == {"app": "convstack"}
    assert store.read() == written
    # The request itself named only that key, under the precondition, as the rollout manager.
    (patch,) = server.sent("PATCH", f"/configmaps/{NAME}")
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body == {
        "metadata": {"resourceVersion": before.revision},
        "data": {"models.config": model_config.format_model_config(canary(initial_config()))},
    }
    assert patch.query["fieldManager"] == ROLLOUT_FIELD_MANAGER
    assert server.managers("ConfigMap", NAMESPACE, NAME)[ROLLOUT_FIELD_MANAGER] == {
        ("data", "models.config")
    }


def test_a_concurrent_edit_between_read_and_write_is_a_conflict_and_survives(server, store):
    before = store.read()
    theirs = model_config.format_model_config(
        model_config.set_version_policy(initial_config(), "digits", specific=[7])
    )
    server.edit(
        "ConfigMap", NAMESPACE, NAME, lambda cm: cm["data"].update({"models.config": theirs})
    )

    with pytest.raises(ConfigConflictError, match="changed since it was read"):
        store.write(canary(before.config), before.revision)
    assert server.get("ConfigMap", NAMESPACE, NAME)["data"]["models.config"] == theirs


def test_an_edit_racing_the_write_itself_is_not_overwritten(server, store):
    before = store.read()
    theirs = model_config.format_model_config(
        model_config.set_version_policy(initial_config(), "digits", all=True)
    )
    # The other writer gets in after our read, at the very moment our PATCH arrives.
    server.before_write = lambda verb, kind, ns, name: server.edit(
        kind, ns, name, lambda cm: cm["data"].update({"models.config": theirs})
    )
    with pytest.raises(ConfigConflictError):
        store.write(canary(before.config), before.revision)
    assert server.get("ConfigMap", NAMESPACE, NAME)["data"]["models.config"] == theirs


def test_update_config_retries_on_the_fresh_config(server, store):
    from convstack.serving.rollout.store import update_config

    def someone_else(verb, kind, ns, name):
        server.edit(kind, ns, name, lambda cm: cm["data"].update({"batching.config": "# tuned\n"}))

    server.before_write = someone_else
    _, after = update_config(store, canary)
    assert after.config == canary(initial_config())
    stored = server.get("ConfigMap", NAMESPACE, NAME)
    assert stored["data"]["batching.config"] == "# tuned\n"  # their edit kept
    assert len(server.sent("PATCH")) == 2


def test_open_store_parses_the_uri():
    store = open_store(f"configmap:{NAMESPACE}/{NAME}:other.config")
    assert isinstance(store, ConfigMapStore)
    assert (store.namespace, store.name, store.key) == (NAMESPACE, NAME, "other.config")


@pytest.mark.parametrize(
    ("seeded", "expected"),
    [
        (None, rf"configmap:{NAMESPACE}/{NAME}:models.config: no ConfigMap '{NAME}' in namespace"),
        (config_map(), r"has no key 'models.config' \(keys: batching.config, monitoring.config\)"),
    ],
)
def test_a_missing_map_or_key_is_one_line_naming_it(server, api, seeded, expected):
    if seeded:
        server.seed(seeded)
    store = ConfigMapStore(NAMESPACE, NAME, api=api)
    with pytest.raises(ConfigStoreError, match=expected) as raised:
        store.read()
    assert "\n" not in str(raised.value)


def test_writing_to_a_missing_map_is_an_error(server, api):
    store = ConfigMapStore(NAMESPACE, NAME, api=api)
    with pytest.raises(ConfigStoreError, match="no ConfigMap"):
        store.write(initial_config(), "1")
    assert server.get("ConfigMap", NAMESPACE, NAME) is None


def test_an_unparsable_config_names_the_store(server, api):
    server.seed(config_map("model_config_list { nonsense }"))
    with pytest.raises(ConfigStoreError, match=f"configmap:{NAMESPACE}/{NAME}:models.config"):
        ConfigMapStore(NAMESPACE, NAME, api=api).read()


def test_an_invalid_config_is_refused_before_it_is_sent(server, store):
    before = store.read()
    broken = model_config.ModelServerConfig()
    broken.model_config_list.config.add(name="digits")  # no base_path
    with pytest.raises(ConfigStoreError, match="refusing to write an invalid config"):
        store.write(broken, before.revision)
    assert server.sent("PATCH") == []


@pytest.mark.parametrize("verb", ["get", "patch"])
def test_forbidden_is_one_line_naming_the_verb_and_object(server, store, verb):
    before = store.read()
    server.deny(verb, "configmaps")
    with pytest.raises(ConfigStoreError) as raised:
        if verb == "get":
            store.read()
        else:
            store.write(canary(before.config), before.revision)
    message = str(raised.value)
    assert "\n" not in message
    assert f"{verb} ConfigMap {NAMESPACE}/{NAME}: forbidden" in message
    assert "cannot" in message and "configmaps" in message


def test_no_cluster_is_one_line(tmp_path):
    with FakeApiServer() as gone:
        kubeconfig = gone.write_kubeconfig(tmp_path / "kubeconfig")
    # The server has stopped: nothing listens on its port any more.
    store = ConfigMapStore(NAMESPACE, NAME, api=KubeApi.from_config(str(kubeconfig)))
    with pytest.raises(
        ConfigStoreError, match=r"cannot reach the Kubernetes API at http://127\.0\.0\.1"
    ) as raised:
        store.read()
    assert "\n" not in str(raised.value)


def test_refused_credentials_are_one_line(server, tmp_path):
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig", token="wrong")
    store = ConfigMapStore(NAMESPACE, NAME, api=KubeApi.from_config(str(kubeconfig)))
    with pytest.raises(
        ConfigStoreError, match="get ConfigMap convstack/convstack-serving-config: unauthorized"
    ):
        store.read()


# -- a real cluster ------------------------------------------------------------------------


@pytest.mark.cluster
def test_round_trip_and_conflict_on_a_real_cluster():
    """The store against the cluster of $KUBECONFIG, in a throwaway namespace."""
    from tests.k8s.test_cluster import REQUIRE_ENV, cluster_unavailable_reason

    reason = cluster_unavailable_reason()
    if reason and os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    if reason:
        pytest.skip(reason)
    api = KubeApi.from_config()
    namespace = f"convstack-store-{uuid.uuid4().hex[:6]}"
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    try:
        seeded = config_map(model_config.format_model_config(initial_config()))
        seeded["metadata"]["namespace"] = namespace
        api.create(seeded, field_manager="convstack-test")
        store = ConfigMapStore(namespace, NAME, api=api)

        before = store.read()
        written = store.write(canary(before.config), before.revision)
        assert store.read() == written
        assert api.read_config_map(namespace, NAME)["data"]["batching.config"] == BATCHING
        with pytest.raises(ConfigConflictError):
            store.write(initial_config(), before.revision)  # stale: must not overwrite
        assert store.read().config == canary(initial_config())
    finally:
        api.delete("Namespace", None, namespace)
