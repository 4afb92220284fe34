"""Fixtures of the container tests: our own Docker engine for the session, and the images, each
built once: the offline Debian base, the TensorFlow stand-in for tensorflow/tensorflow, and the
trainer and serving images from k8s/. Timings and sizes are printed and saved as JSON in
build/containers/images.json."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from tests.containers.engine import Engine, EngineUnavailable

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
HERE = Path(__file__).resolve().parent
REPORT = ROOT / "build" / "containers" / "images.json"


def dockerfile_arg(dockerfile: Path, name: str) -> str:
    """The default of `ARG NAME=...` in a Dockerfile."""
    match = re.search(rf"^ARG {name}=(\S+)$", dockerfile.read_text(), re.MULTILINE)
    assert match, f"{dockerfile} declares no default for ARG {name}"
    return match.group(1)


@pytest.fixture(scope="session")
def engine():
    started = time.monotonic()
    docker = Engine()
    try:
        docker.start()
    except EngineUnavailable as unavailable:
        pytest.skip(f"no Docker engine: {unavailable}")
    docker.timings["engine_ready_seconds"] = time.monotonic() - started
    yield docker
    docker.stop()


@pytest.fixture(scope="session")
def images(engine) -> dict[str, str]:
    """role -> tag: debian, tensorflow, trainer, serving."""
    report: dict = {"build_seconds": {}, "size_mib": {}}
    tags = {"debian": engine.base_image()}
    report["build_seconds"]["debian"] = engine.timings["base_image_seconds"]

    tensorflow_version = dockerfile_arg(K8S / "trainer.Dockerfile", "TF_IMAGE_TAG")
    stand_in = HERE / "tensorflow.Dockerfile"
    inputs = f"{tags['debian']}\n{tensorflow_version}\n{stand_in.read_text()}"
    key = hashlib.sha256(inputs.encode()).hexdigest()[:12]
    tags["tensorflow"] = f"convstack-test-tensorflow:{tensorflow_version}-{key}"
    if engine.has_image(tags["tensorflow"]):
        report["build_seconds"]["tensorflow"] = 0.0
    else:
        report["build_seconds"]["tensorflow"] = engine.build(
            tags["tensorflow"], stand_in, HERE, DEBIAN_IMAGE=tags["debian"],
            TENSORFLOW_VERSION=tensorflow_version,
        )  # fmt: skip

    # The tags the manifests run (the local overlay's Job, the embedded-serving component).
    tags["trainer"] = "convstack-trainer:0.1.0"
    tags["serving"] = "convstack-serving:0.1.0"
    for role in ("trainer", "serving"):
        dockerfile = K8S / f"{role}.Dockerfile"
        report["build_seconds"][role] = engine.build(
            tags[role], dockerfile, ROOT, BASE_IMAGE=tags["tensorflow"]
        )
    engine.prune(keep=list(tags.values()))
    report["size_mib"] = {role: round(engine.image_size_mib(tag), 1) for role, tag in tags.items()}
    report["build_seconds"] = {k: round(v, 1) for k, v in report["build_seconds"].items()}
    report["tags"] = tags
    report["dockerd_start_seconds"] = round(engine.timings["dockerd_start_seconds"], 2)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"container images: {json.dumps(report)}")
    return tags
