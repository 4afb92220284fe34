"""The embedded-serving component (k8s/components/embedded-serving): on the local overlay it
changes the serving Deployment's image and command and nothing else, and the result is valid
for Kubernetes (tests/containers runs it)."""

from __future__ import annotations

import copy

import pytest

from convstack.k8s import render
from tests.containers import pods
from tests.k8s.conftest import require_kubectl
from tests.k8s.manifests import container, one


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> list[dict]:
    require_kubectl()
    return pods.embedded_serving_objects(tmp_path_factory.mktemp("embedded") / "kustomize")


def test_the_objects_are_valid_for_the_pinned_kubernetes(objects):
    render.validate(objects)


def test_only_the_serving_image_and_command_change(objects, rendered):
    swapped = one(objects, "Deployment", "convstack-serving")
    served = container(swapped, "tensorflow-serving")
    assert served["image"] == "convstack-serving:0.1.0"
    assert served["command"] == ["convstack", "serve", "--backend=embedded"]

    original = copy.deepcopy(one(rendered["local"], "Deployment", "convstack-serving"))
    container(original, "tensorflow-serving").update(
        image=served["image"], command=served["command"]
    )
    assert swapped == original
    others = [o for o in objects if o["kind"] != "Deployment"]
    assert others == [o for o in rendered["local"] if o["kind"] != "Deployment"]
