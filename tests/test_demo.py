"""`make demo`: its serving half against an exported version, and its whole story (a better
version 2 promoted, a weak version 3 refused) told quietly."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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


# The story of `make demo` with fewer epochs (25 and 40 there), which still holds with its seed:
# version 1 at V1_EPOCHS, version 2 (random shifts) at V2_EPOCHS, version 3 at one epoch.
V1_EPOCHS, V2_EPOCHS = 10, 16
# What TensorFlow prints on its own when nothing quiets it (C++ start-up lines, tf.distribute's
# per-trace INFO, the tf.data warning).
TF_NOISE = (
    "absl::InitializeLog",
    "I0000 ",
    "cuda_platform.cc",
    "INFO tensorflow",
    "Reduce to /job:",
    "Collective all_reduce",
    "tf.data options",
)
PYTHON_WARNING = re.compile(r"\b[A-Z]\w*Warning: ")


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """`python -m convstack.demo` as `make demo` runs it, in a normal user's environment (no
    TF_CPP_MIN_LOG_LEVEL, no CONVSTACK_LOG_LEVEL)."""
    directory = tmp_path_factory.mktemp("demo")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TF_CPP_MIN_LOG_LEVEL", "CONVSTACK_LOG_LEVEL")
    }
    command = [sys.executable, "-m", "convstack.demo", "--dir", str(directory)]
    command += ["--epochs", str(V1_EPOCHS), "--v2-epochs", str(V2_EPOCHS)]
    # A busy CI machine must not fail this on the latency gate (its own tests cover it).
    command += ["--latency-slack-ms", "50"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500, env=env)
    return result, directory


def _accuracy(stdout: str, version: int) -> float:
    return float(re.search(rf"^version {version}  .* test accuracy ([0-9.]+)", stdout, re.M)[1])


def test_demo_promotes_the_better_version_2_and_refuses_the_weak_version_3(story):
    result, directory = story
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert _accuracy(out, 2) > _accuracy(out, 1) > _accuracy(out, 3)
    assert "version 1 is stable (first rollout of 'digits')" in out
    assert "version 2 is stable; 1 is previous" in out
    assert "gate quality  FAIL" in out and "rolling the canary back" in out
    assert "`rollout run 3` exited 1 (refused, as expected)" in out
    assert "labels: previous=1, stable=2" in out  # rollout status after the refusal
    assert "replicas stopped with exit statuses [0, 0]" in out
    assert "stable: version 2;" in out
    png = directory / "runs" / "digits-v2" / "learning_curves.png"
    assert f"learning curves, versions 1 and 2: {png}" in out and png.stat().st_size > 1000
    assert f"tensorboard --logdir {directory / 'runs'}" in out
    assert (directory / "runs" / "digits-v2" / "tensorboard" / "validation").is_dir()


def test_demo_output_has_no_tensorflow_chatter_and_no_python_warnings(story):
    result, _ = story
    output = result.stdout + result.stderr
    assert [noise for noise in TF_NOISE if noise in output] == []
    assert PYTHON_WARNING.findall(output) == []
    assert f"epoch 1/{V1_EPOCHS}: loss" in result.stderr  # our own lines are there
