"""Fixtures of the Kubernetes tests: every overlay rendered once per session by the real
`kubectl kustomize`."""

from __future__ import annotations

import shutil

import pytest

from convstack.k8s import render

# Listed here (not discovered) so a vanished overlay fails; test_render checks the list is
# complete.
OVERLAYS = ("local", "gpu", "multiworker")
GPU_OVERLAYS = ("gpu", "multiworker")


def require_kubectl() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip(
            "kubectl is not on PATH: rendering k8s/ needs `kubectl kustomize` "
            "(kubectl 1.27 or newer)"
        )


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """overlay name -> its rendered objects."""
    require_kubectl()
    return {name: render.render(name) for name in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request, rendered) -> tuple[str, list[dict]]:
    """(name, objects) of each overlay in turn."""
    return request.param, rendered[request.param]
