"""`convstack k8s rollout` end to end against the stand-in API server (the real `kubernetes`
client over loopback HTTP; every object it receives is schema-validated): the Job it creates
from the overlay's template, the log it streams and the exit status it passes on."""

from __future__ import annotations

import re

import pytest

from convstack.k8s import launch, render
from convstack.k8s.errors import (
    EXIT_API_ERROR,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_OOM_KILLED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
)
from tests.k8s.apiserver import FakeApiServer, PodRun
from tests.k8s.conftest import require_kubectl
from tests.k8s.manifests import container, one, volume

NAMESPACE = "convstack"
# A launcher that never stops waiting must fail the test, not hang it.
pytestmark = pytest.mark.timeout(60)
JOB_NAME = re.compile(r"^convstack-rollout-\d{8}-\d{6}-[0-9a-f]{4}$")
TEMPLATE_FLAGS = [
    "--model=digits",
    "--store=configmap:$(NAMESPACE)/convstack-serving-config",
    "--servers=dns:///convstack-serving-grpc.$(NAMESPACE).svc.cluster.local:8500",
    "--model-repository=/models/digits",
]


@pytest.fixture
def server():
    require_kubectl()
    with FakeApiServer() as server:
        # What `convstack k8s deploy` leaves: the namespace and the serving ConfigMap.
        local = render.render("local")
        server.seed(one(local, "ConfigMap", "convstack-serving-config"))
        yield server
        assert server.invalid == [], "the launcher sent objects invalid for Kubernetes"
        assert server.errors == []


@pytest.fixture
def cli(server, tmp_path, capsys):
    """Run `convstack k8s rollout ARGS [-- ROLLOUT_ARGS]`: (exit status, stdout, stderr)."""
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")

    def run(*args: str, rollout_args: tuple[str, ...] | None = None) -> tuple[int, str, str]:
        argv = [*args, "--kubeconfig", str(kubeconfig), "--poll-interval", "0.01"]
        if rollout_args is not None:
            argv += ["--", *rollout_args]
        status = launch.rollout_main(argv)
        out, err = capsys.readouterr()
        return status, out, err

    return run


def the_job(server) -> dict:
    (job,) = server.of_kind("Job")
    return job


def test_rollout_runs_a_job_from_the_template_and_streams_its_log(server, cli):
    server.script_job(PodRun(logs=["gate infra: ok", "gate quality: 0.97 >= 0.95", "stable: 2"]))
    status, out, _ = cli(
        "--overlay",
        "local",
        "--image",
        "reg/trainer:9",
        rollout_args=("run", "2", "--observe-seconds", "60"),
    )

    assert status == EXIT_OK
    job = the_job(server)
    name = job["metadata"]["name"]
    assert JOB_NAME.match(name)
    assert "suspend" not in job["spec"]  # the template is suspended; its copy runs
    assert job["spec"]["backoffLimit"] == 0
    spec = job["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "convstack-rollout"
    rollout = container(job, "rollout")
    assert rollout["image"] == "reg/trainer:9"
    assert rollout["command"] == ["convstack", "rollout"]
    assert rollout["args"] == ["run", "2", "--observe-seconds", "60", *TEMPLATE_FLAGS]
    models = [m for m in rollout["volumeMounts"] if m["mountPath"] == "/models"]
    assert not models[0].get("readOnly")
    claim = volume(job, models[0]["name"])["persistentVolumeClaim"]["claimName"]
    assert claim == "convstack-models"

    lines = out.splitlines()
    assert lines[:3] == ["gate infra: ok", "gate quality: 0.97 >= 0.95", "stable: 2"]
    assert lines[-1] == f"Job {NAMESPACE}/{name}: `convstack rollout run 2` done"


def test_given_flags_replace_the_templates_and_the_default_verb_is_status(server, cli):
    server.script_job(PodRun(logs=["version 1 AVAILABLE stable"]))
    status, out, _ = cli("--overlay", "local", rollout_args=("--model=cats", "--json"))

    assert status == EXIT_OK
    rollout = container(the_job(server), "rollout")
    assert rollout["image"] == "convstack-trainer:0.1.0"  # the overlay's
    assert rollout["args"] == ["status", "--model=cats", "--json", *TEMPLATE_FLAGS[1:]]
    assert out.splitlines()[-1].endswith("`convstack rollout status` done")


def test_each_rollout_gets_its_own_job(server, cli):
    for _ in range(2):
        server.script_job(PodRun())
        assert cli("--overlay", "local")[0] == EXIT_OK
    names = {j["metadata"]["name"] for j in server.of_kind("Job")}
    assert len(names) == 2


@pytest.mark.parametrize(
    ("exit_code", "status", "verdict"),
    [
        (1, EXIT_FAILED, "stopped (exit 1): a gate failed or a version did not load"),
        (2, EXIT_USAGE, "refused its input (exit 2): the log above says what was wrong"),
        (137, EXIT_FAILED, "failed: pod convstack-rollout-"),
    ],
)
def test_the_rollouts_exit_status_is_passed_on_in_one_line(server, cli, exit_code, status, verdict):
    server.script_job(PodRun(logs=["gate quality: 0.80 < 0.95"], exit_code=exit_code))
    got, out, err = cli("--overlay", "local", rollout_args=("run", "3"))

    assert got == status
    assert out.splitlines()[0] == "gate quality: 0.80 < 0.95"
    final = out.splitlines()[-1]
    assert final.startswith(f"Job {NAMESPACE}/convstack-rollout-")
    assert f"`convstack rollout run 3` {verdict}" in final
    assert "(BackoffLimitExceeded: " in final  # backoffLimit 0: never retried
    assert len(server.of_kind("Pod")) == 1
    assert "Traceback" not in err


def test_an_oom_killed_rollout_says_so(server, cli):
    server.script_job(PodRun(exit_code=137, reason="OOMKilled"))
    status, out, _ = cli("--overlay", "local", rollout_args=("canary", "4"))
    assert status == EXIT_OOM_KILLED
    assert "`convstack rollout canary 4` was OOMKilled (memory limit 4Gi)" in out
    assert "-- status`" in out.splitlines()[-1]


def test_timeout_leaves_the_rollout_running(server, cli):
    server.script_job(PodRun(pending=True))
    status, out, _ = cli("--overlay", "local", "--timeout", "0.05")
    assert status == EXIT_TIMEOUT
    assert "still running after 0.05 s" in out
    assert "kubectl -n convstack logs -f job/convstack-rollout-" in out


def test_the_gpu_overlay_runs_the_rollout_on_cpu(server, cli):
    server.script_job(PodRun())
    assert cli("--overlay", "gpu")[0] == EXIT_OK
    job = the_job(server)
    assert [c["name"] for c in job["spec"]["template"]["spec"]["containers"]] == ["rollout"]
    assert "nvidia.com/gpu" not in container(job, "rollout")["resources"]["limits"]


def test_another_namespace(server, cli):
    server.seed({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-b"}})
    server.script_job(PodRun())
    status, out, _ = cli("--overlay", "local", "--namespace", "team-b")
    assert status == EXIT_OK
    job = the_job(server)
    assert job["metadata"]["namespace"] == "team-b"
    # The store and the servers follow the pod's own namespace (downward API).
    env = container(job, "rollout")["env"]
    assert env == [
        {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    ]
    assert out.splitlines()[-1].startswith("Job team-b/convstack-rollout-")


def test_forbidden_is_one_line_and_no_traceback(server, cli):
    server.deny("create", "jobs")
    status, _, err = cli("--overlay", "local", rollout_args=("promote",))
    assert status == EXIT_API_ERROR
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("convstack k8s rollout: error: create Job convstack/convstack-rollout-")
    assert 'cannot create resource "jobs" in API group "batch"' in err


def test_a_missing_namespace_is_one_line(server, cli):
    status, _, err = cli("--overlay", "local", "--namespace", "nowhere")
    assert status == EXIT_API_ERROR
    assert err.count("\n") == 1
    assert "create Job nowhere/convstack-rollout-" in err and "not found" in err


def test_an_overlay_without_the_rollout_template_is_one_line(server, cli):
    status, _, err = cli("--overlay", "multiworker")
    assert status == EXIT_API_ERROR
    assert err.strip() == (
        "convstack k8s rollout: error: expected one rollout Job in the overlay "
        "(k8s/base/rollout), found 0"
    )
    assert server.of_kind("Job") == []


def test_convstack_k8s_rollout_dispatches_here():
    from convstack import cli as convstack_cli

    assert convstack_cli.resolve(["k8s", "rollout", "--overlay", "local", "--", "run", "2"]) == (
        "k8s rollout",
        ["--overlay", "local", "--", "run", "2"],
    )
    module, function, _ = convstack_cli.COMMANDS["k8s rollout"]
    assert (module, function) == ("convstack.k8s.launch", "rollout_main")
    assert getattr(launch, function) is launch.rollout_main
