"""The container files and the kind CI workflow agree with the manifests and the project, read
(tests/containers builds and runs the images for real)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from convstack.k8s import render
from tests.k8s.manifests import all_containers, by_kind, container, one, pod_spec

ROOT = Path(render.__file__).resolve().parents[2]
DOCKERFILE = ROOT / "k8s" / "trainer.Dockerfile"
DOCKERIGNORE = ROOT / "k8s" / "trainer.Dockerfile.dockerignore"
SERVING_DOCKERFILE = ROOT / "k8s" / "serving.Dockerfile"
WORKFLOW = ROOT / ".github" / "workflows" / "kind-e2e.yml"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        logical.append(current.strip())
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in logical]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module", params=["trainer", "serving"])
def any_dockerfile(request) -> list[tuple[str, str]]:
    return instructions((ROOT / "k8s" / f"{request.param}.Dockerfile").read_text())


def stages(parsed: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction, arguments in parsed:
        if instruction == "FROM":
            result.append([])
        if result:
            result[-1].append((instruction, arguments))
    return result


def base_images(parsed: list[tuple[str, str]]) -> list[str]:
    """Each stage's FROM image with global ARG defaults substituted (a default may name an
    earlier ARG)."""
    defaults: dict[str, str] = {}

    def substitute(text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], text)

    for instruction, arguments in parsed:
        if instruction == "FROM":
            break
        if instruction == "ARG" and "=" in arguments:
            name, value = arguments.split("=", 1)
            defaults[name] = substitute(value)
    return [substitute(a.split()[0]) for i, a in parsed if i == "FROM"]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _tensorflow_pins() -> set[str]:
    """TensorFlow's pin wherever pyproject names it (the base install is the client: only the
    extras that train or serve need TensorFlow)."""
    project = pyproject()["project"]
    lists = [project.get("dependencies", []), *project["optional-dependencies"].values()]
    return {d for deps in lists for d in deps if re.match(r"tensorflow[<>=!~ ;]", d)}


def test_base_image_is_a_pinned_tensorflow_release_matching_the_project(any_dockerfile):
    pins = _tensorflow_pins()
    assert len(pins) == 1, f"the extras pin TensorFlow differently: {sorted(pins)}"
    minor = re.search(r">=(\d+\.\d+)", pins.pop()).group(1)
    for image in base_images(any_dockerfile):
        repository, _, tag = image.partition(":")
        assert repository == "tensorflow/tensorflow"
        assert re.fullmatch(rf"{re.escape(minor)}\.\d+", tag), f"{image} is not a {minor}.x release"


def test_image_installs_the_wheel_with_every_extra(dockerfile):
    runs = [arguments for instruction, arguments in stages(dockerfile)[-1] if instruction == "RUN"]
    installs = [run for run in runs if "pip install" in run and "/wheels/" in run]
    assert len(installs) == 1
    assert '/wheels/*.whl)[all]"' in installs[0]  # the wheel alone is only the client


def test_base_image_is_a_build_argument(any_dockerfile):
    """So the image builds on any base with Python and that TensorFlow (the container tests
    build one offline); without the argument, the default is TensorFlow's image."""
    assert {a.split()[0] for i, a in any_dockerfile if i == "FROM"} == {"${BASE_IMAGE}"}
    assert not any(i == "FROM" and "tensorflow/" in a for i, a in any_dockerfile)


def test_no_syntax_directive_that_would_pull_a_frontend_image():
    for path in (DOCKERFILE, SERVING_DOCKERFILE):
        assert not re.search(r"^#\s*syntax\s*=", path.read_text(), re.MULTILINE | re.IGNORECASE)


def test_serving_image_runs_the_embedded_server_as_the_serving_pods_user(rendered):
    parsed = instructions(SERVING_DOCKERFILE.read_text())
    final = stages(parsed)[-1]
    assert json.loads([a for i, a in final if i == "ENTRYPOINT"][-1])[:2] == ["convstack", "serve"]
    uid, _, gid = [a for i, a in final if i == "USER"][-1].partition(":")
    context = pod_spec(one(rendered["local"], "Deployment", "convstack-serving"))["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid))
    installs = [a for i, a in final if i == "RUN" and "pip install" in a and "/wheels/" in a]
    assert len(installs) == 1 and '/wheels/*.whl)[serving]"' in installs[0]


def test_image_runs_as_the_non_root_user_the_pods_use(dockerfile, rendered):
    users = [
        arguments for instruction, arguments in stages(dockerfile)[-1] if instruction == "USER"
    ]
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) != 0  # numeric: kubelet can verify it
    for job in by_kind(rendered["local"], "Job") + by_kind(rendered["multiworker"], "Job"):
        context = pod_spec(job)["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid))
        assert context["fsGroup"] == int(gid)


def test_image_entrypoint_is_the_convstack_command(dockerfile):
    entrypoints = [a for i, a in stages(dockerfile)[-1] if i == "ENTRYPOINT"]
    assert json.loads(entrypoints[-1]) == ["convstack"]


def test_image_installs_every_package_and_the_context_keeps_them(dockerfile):
    packages = set(pyproject()["tool"]["setuptools"]["package-dir"].values())
    copied = {
        source.rstrip("/")
        for instruction, arguments in dockerfile
        if instruction == "COPY" and not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    }
    needed = {*packages, "pyproject.toml", pyproject()["project"]["readme"]}
    assert needed <= copied
    kept = {
        line[1:].rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    }
    assert copied <= kept, "the .dockerignore drops something the Dockerfile copies"


def test_image_caches_point_at_the_writable_tmp(dockerfile):
    environment = " ".join(a for i, a in stages(dockerfile)[-1] if i == "ENV")
    for variable in ("KERAS_HOME", "MPLCONFIGDIR"):
        assert re.search(rf"{variable}=/tmp/", environment), variable


# --- the kind workflow -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def workflow_commands(workflow: dict) -> str:
    return "\n".join(
        step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]
    )


def test_workflow_runs_the_cluster_tests_on_the_pinned_kubernetes(workflow):
    commands = workflow_commands(workflow)
    assert "docker build -f k8s/trainer.Dockerfile" in commands
    assert re.search(
        r"pytest tests/k8s/test_cluster\.py tests/serving/rollout/test_configmap_store\.py"
        r"\s+-m cluster",
        commands,
    )
    node_image = workflow["env"]["KIND_NODE_IMAGE"]
    assert re.fullmatch(rf"kindest/node:v{re.escape(render.KUBERNETES_VERSION)}\.\d+", node_image)


def test_workflow_loads_the_images_the_local_overlay_runs(workflow, rendered):
    objects = rendered["local"]
    serving_image = container(one(objects, "Deployment"), "tensorflow-serving")["image"]
    trainer_images = {c["image"] for job in by_kind(objects, "Job") for c in all_containers(job)}
    assert workflow["env"]["SERVING_IMAGE"] == serving_image
    assert trainer_images == {workflow["env"]["TRAINER_IMAGE"]}
    assert "kind load docker-image" in workflow_commands(workflow)


def test_requirements_layer_lists_what_the_extras_need(any_dockerfile):
    """The list the images install before the wheel: the extra's requirements with the
    `convstack[...]` self-references expanded, and the base install's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("requirements", ROOT / "k8s" / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    project = pyproject()["project"]
    listed = module.requirements(project, "all")
    assert not any(r.startswith("convstack") for r in listed)
    expected = set(project["dependencies"])
    for name in ("images", "training", "serving", "k8s"):
        expected |= set(project["optional-dependencies"][name])
    assert set(listed) == expected
    runs = " ".join(a for i, a in any_dockerfile if i == "RUN")
    assert re.search(
        r"requirements\.py /src/pyproject\.toml (all|serving) > /requirements\.txt", runs
    )
