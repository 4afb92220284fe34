"""The training Job `convstack k8s train` would create, planned from the rendered overlays
without a cluster (convstack/k8s/training_plan.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from convstack.k8s.errors import LaunchError
from convstack.k8s.objects import unique_job_name
from convstack.k8s.training_plan import (
    INDEX_LABEL,
    JOB_NAME_LABEL,
    chief_selector,
    default_name_prefix,
    merge_trainer_args,
    plan_training,
)
from tests.k8s.manifests import container, service_selects


def test_unique_job_names_fit_kubernetes_limits():
    now = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    assert unique_job_name("convstack-train", now, "ab12") == (
        "convstack-train-20250304-050607-ab12"
    )
    with pytest.raises(LaunchError, match=r"--name-prefix .* is too long"):
        unique_job_name("x" * 40, now, "ab12")


def test_the_default_prefix_is_the_overlays_job_name(rendered):
    assert default_name_prefix(rendered["local"]) == "convstack-train"
    assert default_name_prefix(rendered["multiworker"]) == "convstack-train-mw"
    assert default_name_prefix([]) == "convstack-train"


def test_trainer_args_replace_flags_of_the_same_name():
    base = ["--data=digits", "--epochs=10", "--progress=log"]
    assert merge_trainer_args(base, ["--epochs", "3", "--fast"]) == [
        "--data=digits",
        "--progress=log",
        "--epochs",
        "3",
        "--fast",
    ]


def test_a_given_run_dir_is_kept(rendered):
    plan = plan_training(
        rendered["local"], name="j", image="i", trainer_args=["--run-dir=/runs/old"], namespace="ns"
    )
    assert plan.run_dir is None
    assert container(plan.job, "trainer")["args"].count("--run-dir=/runs/old") == 1
    assert not any(a == "--run-dir=/runs/digits" for a in container(plan.job, "trainer")["args"])


def test_the_multiworker_service_is_renamed_with_its_job(rendered):
    plan = plan_training(
        rendered["multiworker"], name="mw-1", image="i", trainer_args=[], namespace="team-a"
    )
    pod_spec = plan.job["spec"]["template"]["spec"]
    assert (plan.job["metadata"]["name"], plan.job["metadata"]["namespace"]) == ("mw-1", "team-a")
    assert plan.run_dir is not None and plan.run_dir.endswith("/mw-1")
    assert plan.service is not None
    assert plan.service["metadata"]["name"] == pod_spec["subdomain"] == "mw-1"
    assert plan.service["metadata"]["namespace"] == "team-a"
    # It selects this Job's pods and no other Job's.
    labels = plan.job["spec"]["template"]["metadata"].get("labels", {})
    assert service_selects(plan.service, {**labels, JOB_NAME_LABEL: "mw-1"})
    assert not service_selects(plan.service, {**labels, JOB_NAME_LABEL: "mw-2"})
    env = {e["name"]: e.get("value") for e in container(plan.job, "trainer")["env"]}
    assert env["SERVICE_NAME"] == "mw-1"
    # What the Job needs first: the Namespace, the claims, its tf-config ConfigMap.
    kinds = [(o["kind"], o["metadata"]["name"]) for o in plan.prerequisites]
    assert kinds[0] == ("Namespace", "team-a")
    assert {k for k, _ in kinds} == {"Namespace", "PersistentVolumeClaim", "ConfigMap"}
    assert all(n.startswith("convstack-tf-config") for k, n in kinds if k == "ConfigMap")
    assert all(o["metadata"].get("namespace") == "team-a" for o in plan.prerequisites[1:])


def test_only_an_indexed_jobs_chief_is_followed(rendered):
    single = plan_training(rendered["local"], name="a", image="i", trainer_args=[], namespace="n")
    multi = plan_training(
        rendered["multiworker"], name="b", image="i", trainer_args=[], namespace="n"
    )
    assert chief_selector(single.job) == f"{JOB_NAME_LABEL}=a"
    assert chief_selector(multi.job) == f"{JOB_NAME_LABEL}=b,{INDEX_LABEL}=0"


def test_an_overlay_without_one_job_is_refused(rendered):
    no_job = [o for o in rendered["local"] if o["kind"] != "Job"]
    with pytest.raises(LaunchError, match="expected one training Job in the overlay, found 0"):
        plan_training(no_job, name="a", image="i", trainer_args=[], namespace="n")
