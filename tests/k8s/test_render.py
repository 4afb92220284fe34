"""Every overlay renders with the real `kubectl kustomize`, and every object validates strictly
against the Kubernetes schema; the renderer and validator reject what they should."""

from __future__ import annotations

import copy
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from convstack.k8s import render
from tests.k8s.conftest import OVERLAYS, require_kubectl
from tests.k8s.manifests import by_kind, one, pod_spec, workloads

K8S = render.k8s_root()
# Kustomize fields that are deprecated (commonLabels also rewrites immutable selectors).
DEPRECATED_KUSTOMIZE_FIELDS = (
    "commonLabels",
    "patchesStrategicMerge",
    "patchesJson6902",
    "bases",
    "vars",
)


def test_the_tested_overlays_are_all_the_overlays():
    assert tuple(sorted(OVERLAYS)) == tuple(render.overlay_names())


@pytest.mark.parametrize(
    "kubernetes_version",
    [render.KUBERNETES_VERSION, kubernetes_validate.latest_version()],
    ids=["pinned", "newest-known"],
)
def test_every_object_validates_strictly(overlay, kubernetes_version):
    name, objects = overlay
    assert objects, f"{name} rendered nothing"
    assert render.validation_errors(objects, kubernetes_version) == []


def test_each_overlay_holds_its_workloads(rendered):
    names = {
        overlay: sorted(f"{o['kind']}/{o['metadata']['name']}" for o in workloads(objects))
        for overlay, objects in rendered.items()
    }
    assert names == {
        "local": ["Deployment/convstack-serving", "Job/convstack-rollout", "Job/convstack-train"],
        "gpu": ["Deployment/convstack-serving", "Job/convstack-rollout", "Job/convstack-train"],
        "multiworker": ["Deployment/convstack-serving", "Job/convstack-train-mw"],
    }


def test_objects_are_unique_and_in_the_overlay_namespace(overlay):
    _, objects = overlay
    namespace = one(objects, "Namespace")["metadata"]["name"]
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys))
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, render.describe(obj)


def test_namespace_enforces_the_restricted_pod_security_standard(overlay):
    _, objects = overlay
    labels = one(objects, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce-version"] == (f"v{render.KUBERNETES_VERSION}")


def test_every_object_and_pod_carries_the_part_of_label(overlay):
    _, objects = overlay
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "convstack", (
            render.describe(obj)
        )
    for workload in workloads(objects):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "convstack"


def test_referenced_config_maps_and_claims_are_rendered(overlay):
    _, objects = overlay
    config_maps = {o["metadata"]["name"] for o in by_kind(objects, "ConfigMap")}
    claims = {o["metadata"]["name"] for o in by_kind(objects, "PersistentVolumeClaim")}
    for workload in workloads(objects):
        for volume in pod_spec(workload).get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


@pytest.mark.parametrize("kustomization", sorted(K8S.rglob("kustomization.yaml")), ids=str)
def test_kustomizations_use_labels_not_deprecated_fields(kustomization):
    content = yaml.safe_load(kustomization.read_text())
    assert not set(DEPRECATED_KUSTOMIZE_FIELDS) & set(content)
    for entry in content.get("labels", []):
        # Selectors are immutable: adding a label to them would break every later apply.
        assert not entry.get("includeSelectors", False)


# --- the validator is strict ----------------------------------------------------------------


def _deployment(rendered) -> dict:
    return copy.deepcopy(one(rendered["local"], "Deployment"))


def test_validation_reports_an_unknown_field_by_object_and_path(rendered):
    deployment = _deployment(rendered)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    problems = render.validation_errors([deployment])
    assert len(problems) == 1
    assert problems[0].startswith("Deployment/convstack/convstack-serving: ")
    assert "spec.template.spec.containers.0" in problems[0]
    assert "readinessprobe" in problems[0]


def test_validation_reports_a_wrong_type_and_a_missing_required_field(rendered):
    wrong_type = _deployment(rendered)
    wrong_type["spec"]["minReadySeconds"] = "ten"
    missing = _deployment(rendered)
    del missing["spec"]["selector"]
    problems = render.validation_errors([wrong_type, missing])
    assert len(problems) == 2
    assert "minReadySeconds" in problems[0]
    assert "selector" in problems[1]


def test_validation_rejects_a_kind_the_version_does_not_know(rendered):
    hpa = copy.deepcopy(one(rendered["local"], "HorizontalPodAutoscaler"))
    hpa["apiVersion"] = "autoscaling/v2beta2"  # removed in Kubernetes 1.26
    with pytest.raises(render.ManifestValidationError) as raised:
        render.validate([hpa])
    assert "autoscaling/v2beta2" in raised.value.problems[0]


# --- rendering errors and the command line --------------------------------------------------


def test_unknown_overlay_names_the_available_ones():
    with pytest.raises(render.UnknownOverlayError, match="available: gpu, local, multiworker"):
        render.render("staging")


def test_missing_kubectl_is_one_clear_error():
    with pytest.raises(render.RenderError, match="not found on PATH"):
        render.render("local", kubectl="kubectl-that-does-not-exist")


def test_a_kustomize_failure_is_reported_with_kustomize_reason(tmp_path):
    require_kubectl()
    broken = tmp_path / "overlays" / "broken"
    broken.mkdir(parents=True)
    (broken / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(render.RenderError, match=r"kubectl kustomize .*broken: .*missing\.yaml"):
        render.render("broken", root=tmp_path)


def _render_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convstack.k8s.render", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_module_prints_the_validated_manifests(rendered):
    result = _render_command("multiworker")
    assert result.returncode == 0, result.stderr
    assert [d for d in yaml.safe_load_all(result.stdout) if d] == rendered["multiworker"]


def test_module_writes_every_overlay(tmp_path, rendered):
    result = _render_command("--all", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{n}.yaml" for n in sorted(OVERLAYS)]
    written = yaml.safe_load_all((tmp_path / "local.yaml").read_text())
    assert [d for d in written if d] == rendered["local"]


def test_module_exits_2_on_an_unknown_overlay():
    result = _render_command("staging")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "convstack k8s render: error: unknown overlay 'staging'; available: gpu, local, multiworker"
    )


def test_module_exits_1_and_lists_invalid_objects(tmp_path, rendered, monkeypatch):
    overlay = tmp_path / "overlays" / "invalid"
    overlay.mkdir(parents=True)
    deployment = _deployment(rendered)
    deployment["spec"]["replica"] = 2
    (overlay / "deployment.yaml").write_text(yaml.safe_dump(deployment))
    (overlay / "kustomization.yaml").write_text("resources:\n  - deployment.yaml\n")
    monkeypatch.setenv(render.K8S_DIR_ENV, str(tmp_path))
    result = _render_command("invalid")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "1 object(s) invalid for Kubernetes 1.32" in result.stderr
    assert "'replica' was unexpected" in result.stderr
