"""The multi-worker Job's entrypoint (tf-config.sh, taken from the rendered ConfigMap) run for
every completion index, as the pods would run it: each TF_CONFIG must be one the trainer accepts
for MultiWorkerMirroredStrategy, name every worker by the DNS name Kubernetes gives its pod, and
make index 0 (and only it) the chief."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from convstack.trainer.errors import EXIT_BAD_INPUT
from convstack.trainer.strategy import parse_tf_config
from tests.k8s.manifests import (
    container,
    container_port,
    mount_holding,
    one,
    pod_spec,
    pod_template,
    service_selects,
    volume,
)

JOB = "convstack-train-mw"
PRINT_TF_CONFIG = [sys.executable, "-c", "import os; print(os.environ['TF_CONFIG'])"]


@pytest.fixture
def multiworker(rendered) -> list[dict]:
    return rendered["multiworker"]


@pytest.fixture
def job(multiworker) -> dict:
    return one(multiworker, "Job", JOB)


@pytest.fixture
def trainer(job) -> dict:
    return container(job, "trainer")


@pytest.fixture
def script(tmp_path, multiworker, job, trainer) -> Path:
    """The entrypoint script, written from the rendered ConfigMap to a file."""
    path = PurePosixPath(trainer["command"][1])
    mount = mount_holding(trainer, str(path))
    config_map = one(multiworker, "ConfigMap", volume(job, mount["name"])["configMap"]["name"])
    local = tmp_path / path.name
    local.write_text(config_map["data"][str(path.relative_to(mount["mountPath"]))])
    return local


def pod_environment(job: dict, trainer: dict, index: int) -> dict[str, str]:
    """The container's environment as the kubelet would resolve it for pod `index`."""
    # What the Job controller puts on the pod of each index.
    metadata = {
        "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index),
        "metadata.labels['batch.kubernetes.io/job-name']": job["metadata"]["name"],
    }
    environment = {}
    for variable in trainer["env"]:
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
        else:
            environment[variable["name"]] = metadata[variable["valueFrom"]["fieldRef"]["fieldPath"]]
    return environment


def run_entrypoint(script: Path, environment: dict[str, str]) -> subprocess.CompletedProcess:
    """`/bin/sh tf-config.sh CMD...` as the pod runs it, with CMD printing the TF_CONFIG."""
    shell = shutil.which("sh")
    if shell is None:
        pytest.skip("no POSIX sh on PATH to run the entrypoint script")
    return subprocess.run(
        [shell, str(script), *PRINT_TF_CONFIG],
        env={"PATH": "/usr/bin:/bin", **environment},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_container_runs_the_entrypoint_then_the_trainer(trainer):
    command = trainer["command"]
    assert command[0] == "/bin/sh"
    assert command[2:] == ["convstack", "train"]


def test_worker_count_agrees_between_job_and_entrypoint(job, trainer):
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    environment = pod_environment(job, trainer, 0)
    assert spec["parallelism"] == spec["completions"] == int(environment["NUM_WORKERS"]) > 1


def test_pods_get_the_hostnames_the_entrypoint_lists(multiworker, job, trainer):
    environment = pod_environment(job, trainer, 0)
    service = one(multiworker, "Service", pod_spec(job)["subdomain"])
    assert environment["SERVICE_NAME"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    # Workers must resolve each other while they start, before anything is "ready".
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service_selects(service, pod_template(job)["metadata"]["labels"])
    port = int(environment["WORKER_PORT"])
    assert container_port(trainer, "tf-worker") == port
    assert [p["port"] for p in service["spec"]["ports"]] == [port]


def test_every_index_gets_a_valid_multi_worker_tf_config(script, job, trainer):
    workers = job["spec"]["completions"]
    service = pod_spec(job)["subdomain"]
    port = container_port(trainer, "tf-worker")
    # Kubernetes names the pod of index i "<job>-<i>"; with the subdomain it resolves as
    # <job>-<i>.<service> inside the namespace.
    expected_hosts = [f"{JOB}-{i}.{service}:{port}" for i in range(workers)]
    chiefs = []
    for index in range(workers):
        result = run_entrypoint(script, pod_environment(job, trainer, index))
        assert result.returncode == 0, result.stderr
        raw = result.stdout.strip()
        config = json.loads(raw)
        assert config["cluster"] == {"worker": expected_hosts}
        assert config["task"] == {"type": "worker", "index": index}
        role = parse_tf_config(raw)  # what the trainer itself makes of it
        assert role.is_multi_worker and role.num_workers == workers
        assert role.task_index == index
        if role.is_chief:
            chiefs.append(index)
    assert chiefs == [0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"JOB_COMPLETION_INDEX": "4"}, "JOB_COMPLETION_INDEX 4 is not below NUM_WORKERS 4"),
        ({"JOB_COMPLETION_INDEX": "one"}, "JOB_COMPLETION_INDEX must be a number"),
        ({"NUM_WORKERS": "0"}, "NUM_WORKERS must be >= 1"),
        ({"JOB_NAME": ""}, "JOB_NAME must be a DNS name"),
        ({"SERVICE_NAME": 'svc"x'}, "SERVICE_NAME must be a DNS name"),
        ({"WORKER_PORT": "22a"}, "WORKER_PORT must be a number"),
    ],
)
def test_bad_inputs_exit_with_the_bad_input_code(script, job, trainer, override, message):
    # Exit 2 is what the Job's podFailurePolicy fails the Job on, instead of retrying.
    environment = {**pod_environment(job, trainer, 0), **override}
    result = run_entrypoint(script, environment)
    assert result.returncode == EXIT_BAD_INPUT
    assert message in result.stderr
    assert result.stdout == ""
