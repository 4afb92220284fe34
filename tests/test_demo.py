"""The serving half of `make demo` runs end to end against an exported version."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.trainer import export_helpers

pytestmark = pytest.mark.slow


def test_demo_serves_predicts_over_grpc_and_rest_and_stops_cleanly(tmp_path):
    from trainer.export import export_version

    export_version(export_helpers.trained_model(), **export_helpers.export_kwargs(tmp_path))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "convstack.demo",
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
