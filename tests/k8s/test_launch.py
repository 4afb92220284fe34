"""`convstack k8s train` and `convstack k8s deploy` end to end against the stand-in API server
(the real `kubernetes` client over loopback HTTP; every object it receives is schema-validated).
Their pure decisions are tested on plain dicts in test_training_plan, test_training_status and
test_deploy."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convstack.common.kube_api import KubeApi
from convstack.k8s import launch, render
from convstack.k8s.errors import (
    EXIT_API_ERROR,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_OOM_KILLED,
    EXIT_PREEMPTED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
)
from convstack.serving import model_config
from convstack.serving.rollout.configmap_store import ROLLOUT_FIELD_MANAGER, ConfigMapStore
from convstack.serving.rollout.store import update_config
from tests.k8s.apiserver import INDEX_LABEL, JOB_NAME_LABEL, FakeApiServer, PodRun
from tests.k8s.conftest import require_kubectl
from tests.k8s.manifests import container, one, service_selects

NAMESPACE = "convstack"
SERVING_CONFIG = "convstack-serving-config"
# A launcher that never stops waiting must fail the test, not hang it.
pytestmark = pytest.mark.timeout(60)
JOB_NAME = re.compile(r"^convstack-train-\d{8}-\d{6}-[0-9a-f]{4}$")


@pytest.fixture
def server():
    require_kubectl()
    with FakeApiServer() as server:
        yield server
        assert server.invalid == [], "the launcher sent objects invalid for Kubernetes"
        assert server.errors == []


@pytest.fixture
def kubeconfig(server, tmp_path) -> Path:
    return server.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def cli(kubeconfig, capsys):
    """Run a `convstack k8s VERB` against the stand-in: (exit status, stdout, stderr)."""

    def run(verb: str, *args: str, trainer_args: tuple[str, ...] = ()) -> tuple[int, str, str]:
        main = {"train": launch.train_main, "deploy": launch.deploy_main}[verb]
        argv = [*args, "--kubeconfig", str(kubeconfig), "--poll-interval", "0.01"]
        if trainer_args:
            argv += ["--", *trainer_args]
        status = main(argv)
        out, err = capsys.readouterr()
        return status, out, err

    return run


def jobs(server) -> list[dict]:
    return server.of_kind("Job")


def pods_of(server, job_name: str) -> list[dict]:
    return [p for p in server.of_kind("Pod") if p["metadata"]["labels"][JOB_NAME_LABEL] == job_name]


# -- train ---------------------------------------------------------------------------------


def test_train_creates_a_named_job_streams_the_log_and_reports_success(server, cli):
    server.script_job(PodRun(logs=["epoch 1/2 loss 1.9", "epoch 2/2 loss 0.4", "exported 1"]))
    status, out, _ = cli(
        "train",
        "--overlay",
        "local",
        "--image",
        "reg/trainer:7",
        trainer_args=("--epochs=2", "--model-name=cats", "--learning-rate", "0.01"),
    )

    assert status == EXIT_OK
    (job,) = jobs(server)
    name = job["metadata"]["name"]
    assert JOB_NAME.match(name)
    trainer = container(job, "trainer")
    assert trainer["image"] == "reg/trainer:7"
    assert trainer["args"] == [
        "--data=digits",
        "--model-base=/models",
        "--progress=log",
        f"--run-dir=/runs/{name}",  # its own: Jobs never resume each other's checkpoints
        "--epochs=2",
        "--model-name=cats",  # replaces the manifest's --model-name=digits
        "--learning-rate",
        "0.01",
    ]
    # The log, in order, then the verdict.
    assert out.splitlines() == [
        "epoch 1/2 loss 1.9",
        "epoch 2/2 loss 0.4",
        "exported 1",
        f"Job {NAMESPACE}/{name} succeeded, run directory /runs/{name}",
    ]
    # It waited for the pod to start before asking for its log (which it asked for once).
    (log_request,) = server.sent("GET", "/log")
    assert log_request.query == {"container": "trainer", "follow": "true"}
    # The Namespace and claims it needs were applied first, server-side.
    applied = [(r.path.rsplit("/", 1)[-1], r.query) for r in server.sent("PATCH")]
    assert applied == [
        (NAMESPACE, {"fieldManager": "convstack", "force": "true"}),
        ("convstack-models", {"fieldManager": "convstack", "force": "true"}),
        ("convstack-runs", {"fieldManager": "convstack", "force": "true"}),
    ]


def test_each_launch_gets_its_own_job(server, cli):
    server.script_job(PodRun())
    server.script_job(PodRun())
    assert cli("train", "--overlay", "local", "--image", "t:1")[0] == EXIT_OK
    assert (
        cli("train", "--overlay", "local", "--image", "t:1", "--name-prefix", "exp")[0] == EXIT_OK
    )
    names = sorted(j["metadata"]["name"] for j in jobs(server))
    assert len(set(names)) == 2
    assert names[0].startswith("convstack-train-") and names[1].startswith("exp-")


def test_bad_input_fails_at_once_with_its_own_status(server, cli):
    server.script_job(PodRun(logs=["error: --data=nope: no such dataset"], exit_code=2), PodRun())
    status, out, _ = cli("train", "--overlay", "local", "--image", "t:1")
    assert status == EXIT_BAD_INPUT
    assert "error: --data=nope: no such dataset" in out
    assert "failed on bad input: the trainer exited 2" in out
    assert "matching FailJob rule" in out  # the Job's own podFailurePolicy decided
    (job,) = jobs(server)
    assert len(pods_of(server, job["metadata"]["name"])) == 1  # not retried


def test_oom_killed_is_retried_then_reported_with_the_memory_limit(server, cli):
    server.script_job(
        *[PodRun(logs=[f"attempt {i}"], exit_code=137, reason="OOMKilled") for i in range(5)]
    )
    status, out, _ = cli("train", "--overlay", "local", "--image", "t:1")
    assert status == EXIT_OOM_KILLED
    # backoffLimit 4: five attempts, each one's log followed.
    assert [line for line in out.splitlines() if line.startswith("attempt")] == [
        f"attempt {i}" for i in range(5)
    ]
    verdict = out.splitlines()[-1]
    assert "was OOMKilled (memory limit 3Gi), exit code 137" in verdict
    assert "BackoffLimitExceeded" in verdict


def test_a_plain_failure_reports_the_exit_code(server, cli):
    server.script_job(*[PodRun(exit_code=1) for _ in range(5)])
    status, out, _ = cli("train", "--overlay", "local", "--image", "t:1")
    assert status == EXIT_FAILED
    assert re.search(r"failed: pod \S+: trainer exited 1 \(Error\) \(BackoffLimitExceeded", out)


def test_a_preemption_is_survived_and_reported(server, cli):
    server.script_job(
        PodRun(
            logs=["epoch 1", "checkpoint written"], exit_code=75, disruption="PreemptionByScheduler"
        ),
        PodRun(exit_code=75),  # SIGTERM without the condition: also not counted
        PodRun(logs=["resumed at epoch 2", "done"]),
    )
    status, out, _ = cli("train", "--overlay", "local", "--image", "t:1")
    assert status == EXIT_OK
    assert "resumed at epoch 2" in out
    assert "succeeded after 2 preemption(s), resumed from checkpoints" in out


def test_a_job_that_ends_while_preempted_says_so(server, cli):
    server.script_job(PodRun(exit_code=75, disruption="TerminationByKubelet", deadline_after=True))
    status, out, _ = cli("train", "--overlay", "local", "--image", "t:1")
    assert status == EXIT_PREEMPTED
    assert "ended while preempted" in out and "DeadlineExceeded" in out
    assert "rerun with the same --run-dir" in out


def test_timeout_leaves_the_job_running(server, cli):
    server.script_job(PodRun(pending=True))
    status, out, _ = cli("train", "--overlay", "local", "--image", "t:1", "--timeout", "0.05")
    assert status == EXIT_TIMEOUT
    name = jobs(server)[0]["metadata"]["name"]
    assert f"Job {NAMESPACE}/{name} still running after 0.05 s" in out
    assert "ContainerCreating" in out  # where it is stuck
    assert jobs(server)  # not deleted


def test_no_follow_creates_and_returns(server, cli):
    status, out, _ = cli("train", "--overlay", "local", "--image", "t:1", "--no-follow")
    assert status == EXIT_OK
    assert server.sent("GET", "/log") == [] and len(jobs(server)) == 1
    assert "kubectl -n convstack logs -f job/" in out


def test_multiworker_job_service_and_tf_config_agree(server, cli, tmp_path):
    server.script_job(PodRun(logs=["chief says hi"]))
    status, out, _ = cli("train", "--overlay", "multiworker", "--image", "t:1")
    assert status == EXIT_OK
    (job,) = jobs(server)
    name = job["metadata"]["name"]
    assert name.startswith("convstack-train-mw-")
    # One headless Service per Job, named like it, selecting only its pods, owned by it.
    service = server.get("Service", NAMESPACE, name)
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert server.get("Service", NAMESPACE, "convstack-train-mw") is None
    pods = sorted(pods_of(server, name), key=lambda p: int(p["metadata"]["labels"][INDEX_LABEL]))
    assert len(pods) == job["spec"]["parallelism"] == 4
    assert all(service_selects(service, p["metadata"]["labels"]) for p in pods)
    # Only the chief's log was followed.
    (log_request,) = server.sent("GET", "/log")
    assert pods[0]["metadata"]["name"] in log_request.path
    assert "chief says hi" in out
    # The entrypoint, run as each pod runs it, names every worker by its pod's DNS name.
    script = tmp_path / "tf-config.sh"
    (config_map,) = [
        c
        for c in server.of_kind("ConfigMap")
        if c["metadata"]["name"].startswith("convstack-tf-config")
    ]
    script.write_text(config_map["data"]["tf-config.sh"])
    dns_names = [f"{p['spec']['hostname']}.{p['spec']['subdomain']}:2222" for p in pods]
    assert {p["spec"]["subdomain"] for p in pods} == {service["metadata"]["name"]}
    for index, pod in enumerate(pods):
        tf_config = run_entrypoint(script, pod)
        assert tf_config == {
            "cluster": {"worker": dns_names},
            "task": {"type": "worker", "index": index},
        }


def run_entrypoint(script: Path, pod: dict) -> dict:
    """tf-config.sh with the environment the kubelet gives `pod`; its TF_CONFIG."""
    shell = shutil.which("sh")
    if shell is None:
        pytest.skip("no POSIX sh to run the entrypoint")
    metadata = pod["metadata"]
    environment = {}
    for variable in pod["spec"]["containers"][0]["env"]:
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
            continue
        where, key = re.match(
            r"metadata\.(\w+)\['(.+)'\]", variable["valueFrom"]["fieldRef"]["fieldPath"]
        ).groups()
        environment[variable["name"]] = metadata[where][key]
    printer = [sys.executable, "-c", "import os; print(os.environ['TF_CONFIG'])"]
    result = subprocess.run(
        [shell, str(script), *printer], env=environment, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


def test_forbidden_is_one_line_and_no_traceback(server, cli):
    server.deny("create", "jobs")
    status, _, err = cli("train", "--overlay", "local", "--image", "t:1")
    assert status == EXIT_API_ERROR
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("convstack k8s train: error: create Job convstack/convstack-train-")
    assert ": forbidden: " in err
    assert 'User "tester" cannot create resource "jobs" in API group "batch"' in err


def test_a_multiworker_job_without_its_service_is_deleted(server, cli):
    server.deny("create", "services")
    status, _, err = cli("train", "--overlay", "multiworker", "--image", "t:1")
    assert status == EXIT_API_ERROR
    assert "create Service convstack/convstack-train-mw-" in err
    assert jobs(server) == []


def test_no_cluster_is_one_line(tmp_path, capsys):
    require_kubectl()
    with FakeApiServer() as gone:
        kubeconfig = gone.write_kubeconfig(tmp_path / "kubeconfig")
    status = launch.deploy_main(["--overlay", "local", "--kubeconfig", str(kubeconfig)])
    err = capsys.readouterr().err
    assert status == EXIT_API_ERROR
    assert err.count("\n") == 1
    assert "apply Namespace convstack: cannot reach the Kubernetes API at http://127.0.0.1:" in err


def test_an_unknown_overlay_is_a_usage_error(server, cli):
    status, _, err = cli("deploy", "--overlay", "nope")
    assert status == EXIT_USAGE
    assert err.strip() == (
        "convstack k8s deploy: error: unknown overlay 'nope'; available: gpu, local, multiworker"
    )


# -- deploy --------------------------------------------------------------------------------


def test_deploy_applies_the_serving_stack_and_waits_until_available(server, cli, caplog):
    caplog.set_level(logging.INFO, logger="convstack")
    status, out, _ = cli("deploy", "--overlay", "local")
    assert status == EXIT_OK
    assert out.splitlines() == [
        f"created ConfigMap {NAMESPACE}/{SERVING_CONFIG} with the overlay's models.config",
        f"Deployment {NAMESPACE}/convstack-serving is available: 1/1 replicas",
    ]
    assert "0 of 1 updated replicas available" in caplog.text  # progress while it waited
    kinds = sorted(
        (o["kind"], o["metadata"]["name"])
        for k in (
            "Namespace",
            "PersistentVolumeClaim",
            "ConfigMap",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "Job",
        )
        for o in server.of_kind(k)
    )
    assert kinds == [
        ("ConfigMap", SERVING_CONFIG),
        ("Deployment", "convstack-serving"),
        ("HorizontalPodAutoscaler", "convstack-serving"),
        ("Namespace", NAMESPACE),
        ("PersistentVolumeClaim", "convstack-models"),
        ("PersistentVolumeClaim", "convstack-runs"),
        ("PodDisruptionBudget", "convstack-serving"),
        ("Service", "convstack-serving"),
        ("Service", "convstack-serving-grpc"),
    ]  # no training Job
    assert all(r.query.get("force") == "true" for r in server.sent("PATCH"))
    # models.config belongs to the rollout tooling; deploy's own manager never owns it.
    owners = server.managers("ConfigMap", NAMESPACE, SERVING_CONFIG)
    assert ("data", "models.config") in owners[ROLLOUT_FIELD_MANAGER]
    assert ("data", "models.config") not in owners["convstack"]
    assert ("data", "batching.config") in owners["convstack"]


def test_a_second_deploy_keeps_what_a_rollout_wrote(server, cli, kubeconfig):
    assert cli("deploy", "--overlay", "local")[0] == EXIT_OK
    store = ConfigMapStore(NAMESPACE, SERVING_CONFIG, api=KubeApi.from_config(str(kubeconfig)))
    _, rolled_out = update_config(
        store,
        lambda c: model_config.set_version_labels(
            model_config.set_version_policy(c, "digits", specific=[1, 2]),
            "digits",
            {"stable": 1, "canary": 2},
        ),
    )
    # The autoscaler scales the Deployment meanwhile.
    server.edit(
        "Deployment",
        NAMESPACE,
        "convstack-serving",
        lambda d: d["spec"].update(replicas=2),
        manager="horizontal-pod-autoscaler",
    )
    generation = server.get("Deployment", NAMESPACE, "convstack-serving")["metadata"]["generation"]

    status, out, _ = cli("deploy", "--overlay", "local")

    assert status == EXIT_OK
    assert store.read().config == rolled_out.config
    assert out.splitlines()[0] == (
        f"kept models.config of ConfigMap {NAMESPACE}/{SERVING_CONFIG} (differs from the "
        "overlay's, not reverted, last written by convstack-rollout)"
    )
    stored = server.get("ConfigMap", NAMESPACE, SERVING_CONFIG)
    assert set(stored["data"]) == {"models.config", "batching.config", "monitoring.config"}
    deployment = server.get("Deployment", NAMESPACE, "convstack-serving")
    assert deployment["spec"]["replicas"] == 2  # deploy does not own the replica count
    assert deployment["metadata"]["generation"] == generation  # nothing changed: no new rollout
    assert "available: 2/2 replicas" in out


def test_deploy_writes_a_missing_models_config(server, cli):
    rendered = render.render("local")
    config_map = one(rendered, "ConfigMap", SERVING_CONFIG)
    del config_map["data"]["models.config"]
    server.seed(config_map, manager="kubectl")
    status, out, _ = cli("deploy", "--overlay", "local")
    assert status == EXIT_OK
    assert "had no models.config: wrote the overlay's" in out
    stored = server.get("ConfigMap", NAMESPACE, SERVING_CONFIG)
    model_config.parse_model_config(stored["data"]["models.config"])


def test_deploy_reports_a_stuck_rollout(server, cli):
    server.deployment_mode = "stuck"
    status, out, _ = cli("deploy", "--overlay", "local")
    assert status == EXIT_FAILED
    assert "exceeded its progress deadline: ReplicaSet" in out


def test_deploy_into_another_namespace(server, cli):
    status, _, _ = cli("deploy", "--overlay", "gpu", "--namespace", "team-a", "--timeout", "5")
    assert status == EXIT_OK
    assert [n["metadata"]["name"] for n in server.of_kind("Namespace")] == ["team-a"]
    assert {o["metadata"]["namespace"] for o in server.of_kind("Deployment")} == {"team-a"}
