"""Our exports (TensorFlow 2.21) load in the TensorFlow Serving release the manifests deploy.

TF Serving's image cannot be pulled here, so the test uses what its model server is built
on: the TensorFlow of that release, in a venv of its own (tests/compat/tf_env.py). Each version
the trainer exports (a MirroredStrategy run on two replicas; a mixed-precision run with a TFLite
file) is loaded there as TF Serving loads it (tests/compat/load_like_tf_serving.py): the
signatures listed must equal what TensorFlow 2.21 lists, every warmup record must parse and
replay, and the test batch's outputs must equal 2.21's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convstack.k8s import render
from tests.compat import tf_env
from tests.k8s.manifests import container, one

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "load_like_tf_serving.py"
TINY = ["--conv-blocks=1", "--filters=4", "--dense-units=8", "--epochs=1"]
# The exports: one per way of training that changes the graph.
RUNS = {
    "1": ["--replicas=2"],
    "2": ["--mixed-precision", "--tflite"],
}


def deployed_tf_serving_minor() -> str:
    """The minor release of tensorflow/serving the local overlay's Deployment runs."""
    deployment = one(render.render("local"), "Deployment", "convstack-serving")
    image = container(deployment, "tensorflow-serving")["image"]
    repository, _, tag = image.partition(":")
    assert repository == "tensorflow/serving", image
    return ".".join(tag.split(".")[:2])


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> list[Path]:
    """Versions exported by the real trainer (TensorFlow 2.21)."""
    base = tmp_path_factory.mktemp("models")
    for version, flags in RUNS.items():
        command = [sys.executable, "-m", "convstack.cli", "train", "--data=digits"]
        command += [f"--model-base={base}", "--model-name=digits", f"--version={version}"]
        command += [f"--run-dir={base.parent / ('run-' + version)}", "--progress=log"]
        result = subprocess.run(
            [*command, *TINY, *flags], capture_output=True, text=True, timeout=900, check=False
        )
        assert result.returncode == 0, result.stderr[-4000:]
    return [base / "digits" / version for version in RUNS]


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    from convstack.trainer.data import load_dataset

    images, _ = load_dataset("digits").arrays("test")
    path = tmp_path_factory.mktemp("batch") / "test-batch.npy"
    np.save(path, images[:32])
    return path


def load_report(python: Path | str, batch: Path, versions: list[Path]) -> dict:
    result = subprocess.run(
        [str(python), str(SCRIPT), str(batch), *map(str, versions)],
        capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def reports(versions, batch) -> tuple[dict, dict]:
    """(the deployed release's report, ours)."""
    minor = deployed_tf_serving_minor()
    python, seconds = tf_env.python_with_tensorflow(minor)
    print(f"tensorflow {minor} venv: {seconds:.1f}s to make (0: cached)")
    return load_report(python, batch, versions), load_report(sys.executable, batch, versions)


def test_the_venv_runs_the_deployed_releases_tensorflow(reports):
    theirs, ours = reports
    assert theirs["tensorflow"].startswith(deployed_tf_serving_minor() + ".")
    assert ours["tensorflow"].startswith("2.21.")


def test_each_version_lists_the_same_signatures(reports, versions):
    theirs, ours = reports
    for version in map(str, versions):
        assert theirs["versions"][version]["signatures"] == ours["versions"][version]["signatures"]
        assert {"serving_default", "predict_image_bytes"} <= set(
            theirs["versions"][version]["signatures"]
        )


def test_each_versions_warmup_records_parse_and_replay_alike(reports, versions):
    theirs, ours = reports
    for version in map(str, versions):
        replayed = theirs["versions"][version]["warmup"]
        expected = ours["versions"][version]["warmup"]
        assert replayed, f"{version} has no warmup records"
        assert [r["signature"] for r in replayed] == [r["signature"] for r in expected]
        for got, want in zip(replayed, expected, strict=True):
            assert_outputs_equal(got["outputs"], want["outputs"])


def test_each_version_predicts_the_test_batch_as_tensorflow_2_21_does(reports, versions):
    theirs, ours = reports
    for version in map(str, versions):
        batch_outputs = theirs["versions"][version]["batch"]
        assert "serving_default" in batch_outputs
        assert batch_outputs.keys() == ours["versions"][version]["batch"].keys()
        for key, outputs in batch_outputs.items():
            assert_outputs_equal(outputs, ours["versions"][version]["batch"][key])


def assert_outputs_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in got:
        got_array, want_array = np.asarray(got[name]), np.asarray(want[name])
        if got_array.dtype.kind in "iub":
            np.testing.assert_array_equal(got_array, want_array, err_msg=name)
        else:
            np.testing.assert_allclose(got_array, want_array, rtol=1e-5, atol=1e-6, err_msg=name)
