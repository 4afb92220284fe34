"""serving.kube_api against the stand-in API server: the verbs, server-side apply's ownership
rules (which `convstack k8s deploy` relies on to leave models.config alone), and every API
error as one line naming the verb and the object."""

from __future__ import annotations

import pytest

from convstack.common.kube_api import (
    KubeApi,
    KubeConflictError,
    KubeInvalidError,
    KubeNotFoundError,
    KubeUnreachableError,
)
from tests.k8s.apiserver import FakeApiServer, PodRun

NS = "team"


def config_map(**data: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": NS},
        "data": data,
    }


@pytest.fixture
def server():
    with FakeApiServer() as server:
        yield server
        assert server.errors == []


@pytest.fixture
def api(server, tmp_path) -> KubeApi:
    api = KubeApi.from_config(str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    return api


def test_apply_removes_only_what_the_manager_alone_owned(api):
    api.apply(config_map(a="1", b="2"), field_manager="deployer")
    stored = api.read_config_map(NS, "settings")
    # Someone else writes `b` (the same value) and `c`; they now co-own b and own c.
    api.patch_config_map_data(
        NS,
        "settings",
        {"b": "2", "c": "3"},
        stored["metadata"]["resourceVersion"],
        field_manager="editor",
    )
    api.patch_config_map_data(
        NS,
        "settings",
        {"b": "20"},
        api.read_config_map(NS, "settings")["metadata"]["resourceVersion"],
        field_manager="editor",
    )

    # The deployer re-applies without a and b: a goes (only it owned a), b stays (the editor
    # changed it, so owns it), c was never the deployer's.
    applied = api.apply(config_map(d="4"), field_manager="deployer")
    assert applied["data"] == {"b": "20", "c": "3", "d": "4"}


def test_apply_conflicts_unless_forced(api):
    api.apply(config_map(a="1"), field_manager="one")
    with pytest.raises(
        KubeConflictError,
        match=r"^apply ConfigMap team/settings: conflict: "
        r"Apply failed with 1 conflict\(s\): conflict with \"one\": \.data\.a$",
    ):
        api.apply(config_map(a="2"), field_manager="two", force=False)
    assert api.apply(config_map(a="2"), field_manager="two")["data"] == {"a": "2"}


def test_generic_verbs_and_their_errors(server, api):
    created = api.create(config_map(a="1"))
    assert created["metadata"]["resourceVersion"]
    with pytest.raises(KubeConflictError, match=r"^create ConfigMap team/settings: conflict: "):
        api.create(config_map(a="1"))
    with pytest.raises(
        KubeNotFoundError, match=r'^get Job team/nope: not found: jobs\.batch "nope"'
    ):
        api.get_job(NS, "nope")
    api.delete("ConfigMap", NS, "settings")
    with pytest.raises(KubeNotFoundError, match='namespaces "elsewhere" not found'):
        api.create({**config_map(), "metadata": {"name": "x", "namespace": "elsewhere"}})


def test_an_invalid_object_is_refused_with_its_field(server, api):
    bad = config_map(a="1")
    bad["data"]["a"] = 1  # ConfigMap values are strings
    with pytest.raises(
        KubeInvalidError, match=r"^apply ConfigMap team/settings: invalid: .*data\.a"
    ):
        api.apply(bad)
    assert len(server.invalid) == 1
    server.invalid.clear()  # expected here


def test_label_selectors_and_log_streaming(server, api):
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j", "namespace": NS},
        "spec": {
            "template": {
                "metadata": {"labels": {"app": "t"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "trainer", "image": "busybox:1.36"}],
                },
            }
        },
    }
    server.script_job(PodRun(logs=["one", "two", "three"]))
    api.create_job(NS, job)
    assert api.list_pods(NS, "app=other") == []
    (pod,) = api.list_pods(NS, "app=t,batch.kubernetes.io/job-name=j")
    assert pod["status"]["phase"] == "Pending"
    with pytest.raises(KubeInvalidError, match="is waiting to start: ContainerCreating"):
        list(api.follow_pod_log(NS, pod["metadata"]["name"], "trainer"))
    (pod,) = api.list_pods(NS, "app=t")
    assert pod["status"]["phase"] == "Running"
    assert list(api.follow_pod_log(NS, pod["metadata"]["name"], "trainer")) == [
        "one",
        "two",
        "three",
    ]
    assert api.get_job(NS, "j")["status"]["succeeded"] == 1


def test_no_configuration_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(
        KubeUnreachableError, match=r"no Kubernetes configuration: .* does not exist"
    ):
        KubeApi.from_config()


def test_a_broken_kubeconfig_is_one_line(tmp_path):
    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\nkind: Config\ncurrent-context: nowhere\n")
    with pytest.raises(
        KubeUnreachableError, match=f"cannot load the Kubernetes configuration {path}"
    ) as raised:
        KubeApi.from_config(str(path))
    assert "\n" not in str(raised.value)
