"""The serving half of `make demo` runs end to end against an exported version."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.trainer import export_helpers

pytestmark = pytest.mark.slow


def test_demo_serves_predicts_over_grpc_and_rest_and_stops_cleanly(tmp_path):
    from convstack.trainer.export import export_version

    export_version(export_helpers.trained_model(), **export_helpers.export_kwargs(tmp_path))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "convstack.demo.serve",
            "--model-base",
            str(tmp_path),
            "--model-name",
            "tiny",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gRPC: 359 test images, served by version 1" in result.stdout
    assert "CLASS  PROBABILITY" in result.stdout  # the convstack predict CLI table
    assert "REST: first 8 test images" in result.stdout
    assert "server stopped with exit status 0" in result.stdout


def test_rollout_demo_makes_version_1_stable_then_rolls_version_2_out(tmp_path):
    from convstack.trainer.export import export_version

    for version in (1, 2):
        kwargs = export_helpers.export_kwargs(tmp_path / "models", version=version)
        export_version(export_helpers.trained_model(), **kwargs)
    images, labels = export_helpers.held_out_data()
    np.savez(tmp_path / "golden.npz", x_train=images, y_train=labels, x_test=images, y_test=labels)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "convstack.demo.rollout",
            "--model-base",
            str(tmp_path / "models"),
            "--model-name",
            "tiny",
            "--config",
            str(tmp_path / "models.config"),
            "--golden",
            f"npz:{tmp_path / 'golden.npz'}",
            # A busy CI machine must not fail this on the latency gate (its own tests cover it).
            "--latency-slack-ms",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "version 1 is stable (first rollout of 'tiny')" in result.stdout
    assert "gate quality  PASS" in result.stdout and "gate latency  PASS" in result.stdout
    assert "version 2 is stable; 1 is previous" in result.stdout
    assert "labels: previous=1, stable=2" in result.stdout  # rollout status
    assert "replicas stopped with exit statuses [0, 0]" in result.stdout
