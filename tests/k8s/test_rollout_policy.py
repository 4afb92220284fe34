"""The rollout Job template and its access (k8s/base/rollout), asserted on every overlay that
includes it: the Role grants exactly what the ConfigMap store does, on the serving ConfigMap
only; the Job reads the claim serving reads, watches the headless gRPC Service's port, and its
store names the ConfigMap the Deployment mounts. (Hardening, resources and pinned images are
checked for every workload in test_policy.)"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from convstack.common.kube_api import KubeApi
from convstack.serving import model_config
from convstack.serving.rollout.cli import build_parser
from convstack.serving.rollout.configmap_store import ConfigMapStore
from convstack.serving.rollout.store import update_config
from tests.k8s.apiserver import FakeApiServer
from tests.k8s.manifests import (
    by_kind,
    container,
    container_port,
    flags,
    mount_holding,
    one,
    pod_spec,
    volume,
)
from tests.k8s.test_policy import (
    ROLLOUT_ACCOUNT,
    ROLLOUT_JOB,
    config_map_for,
    serving,
    serving_container,
    serving_flags,
)

ROLLOUT_OVERLAYS = ("local", "gpu")
ROLLOUT_CONTAINER = "rollout"
# The rollout Job finds its namespace through the downward API.
NAMESPACE_VAR = "$(NAMESPACE)"


@pytest.fixture(params=ROLLOUT_OVERLAYS)
def objects(request, rendered) -> list[dict]:
    return rendered[request.param]


def rollout_job(objects: list[dict]) -> dict:
    return one(objects, "Job", ROLLOUT_JOB)


def rollout_flags(objects: list[dict]) -> dict:
    spec = container(rollout_job(objects), ROLLOUT_CONTAINER)
    assert spec["command"] == ["convstack", "rollout"]
    return flags(spec["args"][1:])


def served_config_map(objects: list[dict]) -> dict:
    """The ConfigMap holding the models.config the serving Deployment reads."""
    config_map, _ = config_map_for(
        serving(objects),
        serving_container(objects),
        serving_flags(objects)["model_config_file"],
        objects,
    )
    return config_map


def test_the_overlays_with_serving_and_training_on_one_node_include_the_rollout(rendered):
    with_rollout = {name for name, objects in rendered.items() if by_kind(objects, "Role")}
    assert with_rollout == set(ROLLOUT_OVERLAYS)


def test_the_job_is_a_suspended_template_never_retried_and_bounded(objects):
    spec = rollout_job(objects)["spec"]
    assert spec["suspend"] is True  # applying the overlay runs nothing
    assert spec["backoffLimit"] == 0  # a stopped rollout is never repeated blindly
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["ttlSecondsAfterFinished"] > 0
    assert pod_spec(rollout_job(objects))["restartPolicy"] == "Never"


def test_the_job_runs_a_valid_rollout_command_as_its_account(objects):
    spec = container(rollout_job(objects), ROLLOUT_CONTAINER)
    parsed = build_parser().parse_args(spec["args"])
    assert parsed.verb == "status"  # read-only by default
    assert pod_spec(rollout_job(objects))["serviceAccountName"] == ROLLOUT_ACCOUNT
    assert spec["env"] == [
        {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    ]


def test_the_store_is_the_config_map_the_deployment_mounts(objects):
    store = rollout_flags(objects)["store"]
    assert store == f"configmap:{NAMESPACE_VAR}/{served_config_map(objects)['metadata']['name']}"


def test_the_servers_are_every_replica_behind_the_headless_grpc_service(objects):
    headless = one(objects, "Service", "convstack-serving-grpc")
    assert headless["spec"]["clusterIP"] == "None"  # DNS answers every ready pod
    (port,) = headless["spec"]["ports"]
    assert container_port(serving_container(objects), port["targetPort"]) == int(
        serving_flags(objects)["port"]
    )
    expected = f"dns:///{headless['metadata']['name']}.{NAMESPACE_VAR}.svc.cluster.local"
    assert rollout_flags(objects)["servers"] == f"{expected}:{port['port']}"


def test_the_job_writes_the_model_versions_serving_reads(objects):
    job = rollout_job(objects)
    args = rollout_flags(objects)
    config = model_config.parse_model_config(served_config_map(objects)["data"]["models.config"])
    (model,) = [m for m in config.model_config_list.config if m.name == args["model"]]
    # The same path in both pods, on the same claim; read-write for rollout_history.jsonl.
    assert args["model-repository"] == model.base_path
    mount = mount_holding(container(job, ROLLOUT_CONTAINER), model.base_path)
    assert mount is not None and not mount.get("readOnly")
    served = mount_holding(serving_container(objects), model.base_path)
    assert mount["mountPath"] == served["mountPath"]
    claim = volume(job, mount["name"])["persistentVolumeClaim"]["claimName"]
    assert claim == volume(serving(objects), served["name"])["persistentVolumeClaim"]["claimName"]
    assert PurePosixPath(model.base_path).is_relative_to(mount["mountPath"])


def test_the_account_is_bound_to_the_role_in_its_namespace(objects):
    account = one(objects, "ServiceAccount", ROLLOUT_ACCOUNT)
    role = one(objects, "Role")
    binding = one(objects, "RoleBinding")
    namespace = account["metadata"]["namespace"]
    assert account["automountServiceAccountToken"] is False  # only pods that ask get a token
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": ROLLOUT_ACCOUNT, "namespace": namespace}
    ]
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")


def test_the_role_grants_exactly_what_the_config_map_store_does(objects, tmp_path):
    """Run the real ConfigMap store (read, a concurrent edit, re-read, write) against the
    stand-in API server and derive the verbs it uses: the Role grants those and nothing else,
    on that one ConfigMap."""
    config_map = served_config_map(objects)
    used = store_requests(config_map, tmp_path / "kubeconfig")
    (rule,) = one(objects, "Role")["rules"]
    assert rule["apiGroups"] == [""] and rule["resources"] == ["configmaps"]
    assert rule["resourceNames"] == [config_map["metadata"]["name"]]
    assert {name for _, name in used} == {config_map["metadata"]["name"]}
    assert sorted(rule["verbs"]) == sorted({verb for verb, _ in used}) == ["get", "patch"]


def store_requests(config_map: dict, kubeconfig: Path) -> set[tuple[str, str]]:
    """(verb, ConfigMap name) of every request the store makes to edit models.config, with a
    concurrent edit in between (so its conflict path is exercised too)."""
    namespace, name = config_map["metadata"]["namespace"], config_map["metadata"]["name"]
    verbs = {"GET": "get", "PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}
    with FakeApiServer() as server:
        server.seed(config_map)
        store = ConfigMapStore(
            namespace, name, api=KubeApi.from_config(str(server.write_kubeconfig(kubeconfig)))
        )
        interfered = []

        def edit(config):
            if not interfered:  # someone else writes between our read and our write
                interfered.append(True)
                server.edit("ConfigMap", namespace, name, lambda o: o["data"].update(x="1"))
            return config

        update_config(store, edit)
        assert interfered and server.invalid == []
        requests = server.sent(path_part="/configmaps")
    assert [r.method for r in requests] == ["GET", "PATCH", "GET", "PATCH"]
    return {(verbs[r.method], r.path.rsplit("/", 1)[-1]) for r in requests}
