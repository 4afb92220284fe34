"""End to end on a real cluster (kind in CI, see .github/workflows/kind-e2e.yml): the `local`
overlay, rendered as `make k8s-render` renders it, trains a model as a Job (`convstack k8s
train`), serves it with tensorflow/serving (`convstack k8s deploy`), answers Predict through the
convstack client, then rolls a second version out through the rollout's ConfigMap store.

Run with `pytest -m cluster` and KUBECONFIG pointing at a cluster that can pull (or has loaded)
the trainer image ($CONVSTACK_TRAINER_IMAGE, default the overlay's) and tensorflow/serving.
Everything happens in a fresh namespace, deleted afterwards (unless CONVSTACK_E2E_KEEP=1).
Without a reachable cluster the tests skip, saying why (they fail instead when
CONVSTACK_REQUIRE_CLUSTER=1, as in CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import yaml

from convstack.client.sync_client import PredictionClient
from convstack.k8s import render
from convstack.k8s.launch import deploy_main, train_main
from convstack.k8s.objects import in_namespace
from convstack.serving.rollout import plan as rollout_plan
from convstack.serving.rollout.configmap_store import ConfigMapStore
from convstack.serving.rollout.store import update_config
from convstack.serving.rollout.watch import wait_for_state
from tests.k8s.manifests import container, one

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

OVERLAY = "local"
TRAINER_IMAGE_ENV = "CONVSTACK_TRAINER_IMAGE"
KEEP_ENV = "CONVSTACK_E2E_KEEP"
# Set in CI, where a missing cluster is a broken setup rather than a reason to skip.
REQUIRE_ENV = "CONVSTACK_REQUIRE_CLUSTER"
MODEL = "digits"
SERVING_CONFIG = "convstack-serving-config"
# Generous bounds for image pulls and CPU training on a CI runner; they stop a hung test, they
# are not performance assertions.
JOB_DEADLINE_S = 1800
ROLLOUT_DEADLINE_S = 900
# kubelet syncs ConfigMap volumes within about a minute, then TF Serving polls models.config.
CONFIG_PROPAGATION_DEADLINE_S = 300


def cluster_unavailable_reason() -> str | None:
    if not os.environ.get("KUBECONFIG"):
        return "KUBECONFIG is not set: the cluster tests need a Kubernetes cluster (e.g. kind)"
    if shutil.which("kubectl") is None:
        return "kubectl is not on PATH"
    result = subprocess.run(
        ["kubectl", "get", "--raw", "/readyz", "--request-timeout=10s"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"the cluster of KUBECONFIG={os.environ['KUBECONFIG']} is not reachable: {reason}"
    return None


@dataclass
class Cluster:
    namespace: str

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            ["kubectl", "--namespace", self.namespace, *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def apply(self, objects: list[dict]) -> None:
        self.kubectl(
            "apply",
            "--server-side",
            "--field-manager=convstack-e2e",
            "-f",
            "-",
            stdin=yaml.safe_dump_all(objects),
        )

    def get(self, kind: str, name: str) -> dict:
        return json.loads(self.kubectl("get", kind, name, "-o", "json"))

    def diagnostics(self, selector: str) -> str:
        pods = self.kubectl("get", "pods", "-l", selector, "-o", "wide", check=False)
        logs = self.kubectl(
            "logs", "-l", selector, "--all-containers", "--prefix", "--tail=100", check=False
        )
        return f"{pods}\n{logs}"


@pytest.fixture(scope="module")
def reachable_cluster() -> None:
    """Skip (or, with CONVSTACK_REQUIRE_CLUSTER=1, fail) unless a cluster answers."""
    reason = cluster_unavailable_reason()
    if reason and os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def objects(reachable_cluster) -> list[dict]:
    """The local overlay, validated, with the trainer image the cluster has."""
    rendered = render.render(OVERLAY)
    render.validate(rendered)
    image = os.environ.get(TRAINER_IMAGE_ENV)
    if image:
        for obj in rendered:
            if obj["kind"] == "Job":
                container(obj, "trainer")["image"] = image
    return rendered


@pytest.fixture(scope="module")
def cluster(reachable_cluster, objects) -> Iterator[Cluster]:
    """A fresh namespace with the overlay's claims; deleted afterwards."""
    namespace = f"convstack-e2e-{uuid.uuid4().hex[:6]}"
    cluster = Cluster(namespace)
    placed = [in_namespace(o, namespace) for o in objects]
    cluster.apply([o for o in placed if o["kind"] in ("Namespace", "PersistentVolumeClaim")])
    yield cluster
    if os.environ.get(KEEP_ENV) != "1":
        subprocess.run(
            ["kubectl", "delete", "namespace", namespace, "--wait=false"],
            capture_output=True,
            check=False,
        )


def train(cluster: Cluster, objects: list[dict], version: int) -> None:
    """Version `version`, trained briefly by a Job that `convstack k8s train` creates and
    follows (its own run directory; the image the cluster has)."""
    image = container(one(objects, "Job", "convstack-train"), "trainer")["image"]
    code = train_main(
        [
            "--overlay", OVERLAY, "--image", image, "--namespace", cluster.namespace,
            "--timeout", str(JOB_DEADLINE_S), "--",
            f"--run-dir=/runs/e2e-v{version}", "--epochs=5", f"--version={version}",
        ]
    )  # fmt: skip
    if code != 0:
        details = cluster.diagnostics("app.kubernetes.io/part-of=convstack")
        raise AssertionError(f"convstack k8s train exited with {code}\n{details}")


@dataclass
class PortForward:
    process: subprocess.Popen
    grpc_port: int


@pytest.fixture(scope="module")
def served(cluster, objects) -> Iterator[PortForward]:
    """Version 1 trained, the serving stack applied and rolled out, and a port-forward to it."""
    train(cluster, objects, version=1)
    code = deploy_main(
        ["--overlay", OVERLAY, "--namespace", cluster.namespace,
         "--timeout", str(ROLLOUT_DEADLINE_S)]
    )  # fmt: skip
    if code != 0:
        details = cluster.diagnostics("app.kubernetes.io/component=serving")
        raise AssertionError(f"convstack k8s deploy exited with {code}\n{details}")
    process = subprocess.Popen(
        ["kubectl", "--namespace", cluster.namespace, "port-forward",
         "deployment/convstack-serving", ":8500"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    line = process.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8500"
    match = re.search(r"127\.0\.0\.1:(\d+) -> 8500", line)
    if match is None:
        process.kill()
        raise AssertionError(f"kubectl port-forward said: {line!r}")
    yield PortForward(process, int(match.group(1)))
    process.terminate()
    process.wait(timeout=30)


def digits_test_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Test images preprocessed as the trainer does (the client's job for `images`)."""
    from convstack.trainer.data import load_dataset

    images, labels = load_dataset("digits").arrays("test", limit=count)
    return np.ascontiguousarray(images), np.asarray(labels)


def predict(
    forward: PortForward, images: np.ndarray, label: str | None = None
) -> tuple[int, np.ndarray, np.ndarray]:
    """(served version, probabilities, classes) through the convstack client."""
    target = f"127.0.0.1:{forward.grpc_port}"
    with PredictionClient(target, MODEL, version_label=label, timeout=60) as client:
        prediction = client.predict(images)
    return prediction.version, prediction["probabilities"], prediction["classes"]


def test_the_trained_version_is_served_and_predicts(served):
    images, labels = digits_test_images(64)
    version, probabilities, classes = predict(served, images)
    assert version == 1
    assert probabilities.shape == (64, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    assert np.array_equal(classes, probabilities.argmax(axis=1))
    assert (classes == labels).mean() > 0.5  # trained, not random (chance is 0.1)


def test_a_second_version_rolls_out_through_the_config_map(cluster, objects, served):
    train(cluster, objects, version=2)
    # The rollout's own config store, plan and watch: load, then label stable=1 / canary=2,
    # each step written with a resourceVersion precondition and waited for on the replica.
    store = ConfigMapStore(cluster.namespace, SERVING_CONFIG)
    state = rollout_plan.model_state(store.read().config, MODEL, versions_on_disk=[1, 2])
    target = f"127.0.0.1:{served.grpc_port}"
    for step in rollout_plan.steps_to(state, {"stable": 1, "canary": 2}):
        update_config(store, lambda c, s=step.state: rollout_plan.apply_state(c, MODEL, s))
        wait_for_state([target], MODEL, step.state, CONFIG_PROPAGATION_DEADLINE_S)

    images, _ = digits_test_images(8)
    served_versions = {label: predict(served, images, label)[0] for label in ("stable", "canary")}
    assert served_versions == {"stable": 1, "canary": 2}
    # The pod was not restarted: the directory-mounted ConfigMap updated in place.
    pods = json.loads(
        cluster.kubectl("get", "pods", "-l", "app.kubernetes.io/component=serving", "-o", "json")
    )
    assert all(
        status["restartCount"] == 0
        for pod in pods["items"]
        for status in pod["status"]["containerStatuses"]
    )
