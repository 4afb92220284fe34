"""The images of k8s/, built and run for real in our own Docker engine (issue #14).

The trainer image runs as the training Jobs run it: the pod's uid/gid, read-only root file
system, /tmp a tmpfs (the emptyDir), the claims as bind mounts, the Job's own command and args
from the rendered manifests (plus flags that keep the run small). One container is SIGTERMed
after its first checkpoint, as a preemption would, and a second one resumes; the host's
embedded server serves the export. Two containers on one Docker network run the Indexed Job's
workers through the manifests' tf-config.sh. The serving image runs with the Deployment's
command, args, mounts and security settings from the embedded-serving component, and the
Deployment's readiness probe runs inside it, as the kubelet runs an exec probe.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from convstack.k8s import render
from tests.containers import pods
from tests.containers.conftest import K8S
from tests.k8s.manifests import container, one

pytestmark = [pytest.mark.containers, pytest.mark.slow]

# Small runs: the smallest model the flags allow for the workers, the default one for the
# single-worker run (so training lasts a few seconds after its first checkpoint at step 5).
TINY = ["--conv-blocks=1", "--filters=4", "--dense-units=8"]
EPOCHS = 4
SINGLE = [f"--epochs={EPOCHS}", "--checkpoint-every=5"]
STEPS_PER_EPOCH = 19  # digits, global batch 64
WAIT_SECONDS = 600  # no-hang bounds, not timing thresholds


def owned_by_pod_user(path: Path) -> Path:
    """A host directory standing for a claim: the kubelet's fsGroup would make it the pod's."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 1000, 1000)
    return path


@dataclass
class Containers:
    """Containers of one test module, removed at its end."""

    engine: object
    names: list[str]

    def start(self, *run_args: str, network: str | None = None, alias: str | None = None) -> str:
        name = f"convstack-test-{uuid.uuid4().hex[:8]}"
        options = [f"--name={name}"]
        if network:
            options += [f"--network={network}", f"--network-alias={alias}"]
        self.engine.run("run", "--detach", *options, *run_args)
        self.names.append(name)
        return name

    def wait(self, name: str) -> int:
        return int(self.engine.run("wait", name, timeout=WAIT_SECONDS).stdout.strip())

    def logs(self, name: str) -> str:
        result = self.engine.run("logs", name)
        return result.stdout + result.stderr


@pytest.fixture(scope="module")
def containers(engine, images):
    made = Containers(engine, [])
    yield made
    for name in made.names:
        engine.run("rm", "--force", "--volumes", name, check=False)


def training_job(objects: list[dict], name: str) -> dict:
    return one(objects, "Job", name)


# --- one worker: train, SIGTERM, resume, export --------------------------------------------


@dataclass
class SingleRun:
    models: Path
    runs: Path
    stopped_code: int
    stopped_log: str
    resumed_code: int
    resumed_log: str
    seconds: dict


@pytest.fixture(scope="module")
def single_run(containers, images, tmp_path_factory) -> SingleRun:
    """The local overlay's training Job in a container, SIGTERMed after its first checkpoint;
    then the same Job again, which resumes and exports."""
    job = training_job(render.render("local"), "convstack-train")
    volumes = tmp_path_factory.mktemp("volumes")
    sources = {
        "convstack-models": owned_by_pod_user(volumes / "models"),
        "convstack-runs": owned_by_pod_user(volumes / "runs"),
    }
    args = pods.run_args(job, "trainer", images["trainer"], sources=sources, extra=SINGLE)
    run_dir = sources["convstack-runs"] / "digits"  # the Job's --run-dir=/runs/digits

    started = time.monotonic()
    first = containers.start(*args)
    deadline = time.monotonic() + WAIT_SECONDS
    while not list((run_dir / "checkpoints").glob("ckpt-*.index")):
        state = containers.engine.run("inspect", "--format", "{{.State.Running}}", first).stdout
        assert state.strip() == "true", containers.logs(first)[-4000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.1)
    containers.engine.run("kill", "--signal=TERM", first)
    stopped_code = containers.wait(first)
    stopped = time.monotonic()
    second = containers.start(*args)
    resumed_code = containers.wait(second)
    return SingleRun(
        models=sources["convstack-models"],
        runs=sources["convstack-runs"],
        stopped_code=stopped_code,
        stopped_log=containers.logs(first),
        resumed_code=resumed_code,
        resumed_log=containers.logs(second),
        seconds={"first": stopped - started, "second": time.monotonic() - stopped},
    )


def test_sigterm_exits_75_and_a_second_container_resumes_from_the_same_step(single_run):
    print(f"single worker: {json.dumps({k: round(v, 1) for k, v in single_run.seconds.items()})}")
    assert single_run.stopped_code == 75, single_run.stopped_log[-4000:]
    preempted = re.search(r"preempted at step (\d+) ", single_run.stopped_log)
    assert preempted, single_run.stopped_log[-4000:]
    step = int(preempted.group(1))
    assert 0 < step < EPOCHS * STEPS_PER_EPOCH  # stopped mid-run, not at its end

    assert single_run.resumed_code == 0, single_run.resumed_log[-4000:]
    assert re.search(rf"resumed from \S+ \(step {step}\)", single_run.resumed_log), (
        single_run.resumed_log[-4000:]
    )
    history = json.loads((single_run.runs / "digits" / "history.json").read_text())
    assert [record["epoch"] for record in history] == list(range(1, EPOCHS + 1))


def test_the_container_exports_one_version_owned_by_the_pod_user(single_run):
    model_dir = single_run.models / "digits"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]
    version = model_dir / "1"
    assert (version / "saved_model.pb").is_file()
    assert (version / "assets.extra" / "tf_serving_warmup_requests").is_file()
    assert (version.stat().st_uid, version.stat().st_gid) == (1000, 1000)


def rest_predictions(port: int, model: str, images: np.ndarray) -> dict:
    body = json.dumps({"instances": images.tolist()}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/models/{model}:predict", data=body, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, np.ndarray]:
    from convstack.trainer.data import load_dataset

    images, labels = load_dataset("digits").arrays("test")
    return images[:32], labels[:32]


@pytest.fixture(scope="module")
def host_predictions(single_run, test_images, tmp_path_factory) -> dict:
    """The container's export served by the embedded server on the host."""
    from convstack.serving.process import ServerProcess

    log = tmp_path_factory.mktemp("host-server") / "server.log"
    server = ServerProcess.start("digits", single_run.models / "digits", log)
    try:
        server.wait_available("digits")
        return rest_predictions(server.rest_port, "digits", test_images[0])
    finally:
        server.stop(timeout=60)


def test_the_hosts_embedded_server_serves_the_containers_export(
    single_run, host_predictions, test_images
):
    import tensorflow as tf

    images, _ = test_images
    rows = host_predictions["predictions"]
    assert len(rows) == len(images)
    signature = tf.saved_model.load(str(single_run.models / "digits" / "1")).signatures
    expected = signature["serving_default"](images=tf.constant(images))
    assert [row["classes"] for row in rows] == expected["classes"].numpy().tolist()
    np.testing.assert_allclose(
        [row["probabilities"] for row in rows], expected["probabilities"].numpy(), atol=1e-5
    )


# --- two workers: the Indexed Job through tf-config.sh ------------------------------------


def test_two_worker_containers_through_tf_config_export_exactly_one_version(
    containers, images, tmp_path_factory
):
    objects = pods.kustomize(K8S / "base" / "training-multiworker")
    job = training_job(objects, "convstack-train-mw")
    service = one(objects, "Service", "convstack-train-mw")["metadata"]["name"]
    assert container(job, "trainer")["command"][:2] == ["/bin/sh", "/etc/convstack/tf-config.sh"]
    volumes = tmp_path_factory.mktemp("mw-volumes")
    config_map = pods.config_map_named(objects, "convstack-tf-config")
    sources = {
        "convstack-models": owned_by_pod_user(volumes / "models"),
        "convstack-runs": owned_by_pod_user(volumes / "runs"),
        config_map: pods.config_map_files(objects, config_map, volumes / "tf-config"),
    }
    network = f"convstack-test-{uuid.uuid4().hex[:8]}"
    containers.engine.run("network", "create", network)
    job_name = job["metadata"]["name"]
    workers: list[str] = []
    try:
        started = time.monotonic()
        for index in (0, 1):
            fields = {"JOB_COMPLETION_INDEX": str(index), "JOB_NAME": job_name}
            args = pods.run_args(
                job, "trainer", images["trainer"], sources=sources, field_values=fields,
                extra=["--epochs=1", *TINY],
            )  # fmt: skip
            # The pod's DNS name under the headless Service (spec.subdomain).
            alias = f"{job_name}-{index}.{service}"
            workers.append(containers.start(*args, network=network, alias=alias))
        codes = [containers.wait(worker) for worker in workers]
        seconds = time.monotonic() - started
        logs = [containers.logs(worker) for worker in workers]
    finally:
        for worker in workers:
            containers.engine.run("rm", "--force", worker, check=False)
        containers.engine.run("network", "rm", network, check=False)
    print(f"two workers: {seconds:.1f}s")
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    for index, log in enumerate(logs):
        assert f'"task":{{"type":"worker","index":{index}}}' in log  # tf-config.sh's TF_CONFIG
    model_dir = sources["convstack-models"] / "digits"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]
    assert (model_dir / "1" / "saved_model.pb").is_file()
    run_dir = sources["convstack-runs"] / "digits-multiworker"
    assert not list(run_dir.glob(".scratch-*"))


# --- the serving image, as the embedded-serving component deploys it -----------------------


@dataclass
class ServingContainer:
    name: str
    deployment: dict
    rest_port: int


@pytest.fixture(scope="module")
def serving(containers, images, single_run, tmp_path_factory) -> ServingContainer:
    directory = tmp_path_factory.mktemp("serving")
    objects = pods.embedded_serving_objects(directory / "kustomize")
    deployment = one(objects, "Deployment", "convstack-serving")
    spec = container(deployment, "tensorflow-serving")
    assert spec["image"] == images["serving"]
    sources = {
        "convstack-models": single_run.models,
        "convstack-serving-config": pods.config_map_files(
            objects, "convstack-serving-config", directory / "config"
        ),
    }
    args = pods.run_args(deployment, "tensorflow-serving", spec["image"], sources=sources)
    rest = next(p["containerPort"] for p in spec["ports"] if p["name"] == "http")
    name = containers.start(f"--publish=127.0.0.1::{rest}", *args)
    published = containers.engine.run("port", name, f"{rest}/tcp").stdout.split()[0]
    return ServingContainer(name, deployment, int(published.rsplit(":", 1)[1]))


def probe_command(deployment: dict, which: str) -> list[str]:
    return container(deployment, "tensorflow-serving")[which]["exec"]["command"]


def exec_in(containers, name: str, command: list[str]) -> int:
    return containers.engine.run("exec", name, *command, check=False, timeout=60).returncode


def wait_ready(containers, serving: ServingContainer) -> None:
    """Run the readiness probe in the container, as the kubelet would, until it passes."""
    probe = probe_command(serving.deployment, "readinessProbe")
    deadline = time.monotonic() + WAIT_SECONDS
    while exec_in(containers, serving.name, probe) != 0:
        state = containers.engine.run("inspect", "--format", "{{.State.Running}}", serving.name)
        assert state.stdout.strip() == "true", containers.logs(serving.name)[-4000:]
        assert time.monotonic() < deadline, containers.logs(serving.name)[-4000:]
        time.sleep(1)


def test_the_readiness_probe_passes_in_the_serving_container_once_it_serves(containers, serving):
    wait_ready(containers, serving)
    probe = probe_command(serving.deployment, "readinessProbe")
    # The same probe for a model the server does not have fails.
    assert exec_in(containers, serving.name, [*probe[:-1], "absent"]) != 0
    # preStop's command exists in the image (a missing one would fail the hook).
    prestop = container(serving.deployment, "tensorflow-serving")["lifecycle"]["preStop"]
    assert exec_in(containers, serving.name, [prestop["exec"]["command"][0], "0"]) == 0


def test_the_serving_container_predicts_as_the_hosts_server(
    containers, serving, host_predictions, test_images
):
    wait_ready(containers, serving)
    served = rest_predictions(serving.rest_port, "digits", test_images[0])
    assert [r["classes"] for r in served["predictions"]] == [
        r["classes"] for r in host_predictions["predictions"]
    ]
    np.testing.assert_allclose(
        [r["probabilities"] for r in served["predictions"]],
        [r["probabilities"] for r in host_predictions["predictions"]],
        atol=1e-6,
    )
