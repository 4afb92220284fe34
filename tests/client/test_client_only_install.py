"""`pip install convstack` without extras is the client alone: a fresh venv gets no TensorFlow,
and its client library, `convstack predict | status | metadata` and the load generator talk to
the embedded server (started from the full environment); a verb of an extra exits 2 naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.client.conftest import MODEL, images
from tests.test_layout import _source_copy

pytestmark = pytest.mark.slow

LIBRARY = """
import importlib.util, json, sys
import numpy as np
from convstack.client import PredictionClient
with PredictionClient(sys.argv[1], sys.argv[2]) as client:
    prediction = client.predict({"images": np.load(sys.argv[3])})
    statuses = client.status()
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "tensorflow_serving"})
print(json.dumps({
    "installed": importlib.util.find_spec("tensorflow") is not None,
    "imported": heavy,
    "outputs": sorted(prediction.outputs),
    "version": prediction.version,
    "statuses": [s["version"] for s in statuses],
}))
"""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    # Outside the repository and without PYTHONPATH: only what the venv installed is found.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv with `pip install <repo>`, no extras, through the host's pip settings."""
    root = tmp_path_factory.mktemp("client-only")
    source = _source_copy(root / "src")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)])
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("client-only-inputs")
    npy = folder / "batch.npy"
    np.save(npy, images(4))
    png = folder / "digit.png"
    Image.fromarray((images(1, seed=3)[0, ..., 0] * 255).astype(np.uint8)).save(png)
    return {"npy": npy, "png": png}


def test_the_base_install_has_no_tensorflow_and_the_library_works(client_venv, server, inputs):
    python = str(client_venv / "bin" / "python")

    result = _run([python, "-c", LIBRARY, server.target, MODEL, str(inputs["npy"])], cwd="/")

    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    assert found["installed"] is False
    assert found["imported"] == []
    assert found["version"] == 2
    assert found["statuses"] == [2, 1]
    assert found["outputs"]


@pytest.mark.parametrize(
    "verb",
    [
        ["status"],
        ["metadata"],
        ["predict", "--npy", "NPY"],
    ],
    ids=["status", "metadata", "predict-npy"],
)
def test_the_client_commands_work_from_the_base_install(client_venv, server, inputs, verb):
    argv = [{"PNG": str(inputs["png"]), "NPY": str(inputs["npy"])}.get(a, a) for a in verb]
    command = [str(client_venv / "bin" / "convstack"), argv[0]]
    command += ["--target", server.target, "--model", MODEL, *argv[1:]]

    result = _run(command, cwd="/")

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


def test_the_load_generator_works_from_the_base_install(client_venv, server, tmp_path):
    out = tmp_path / "load.json"
    command = [str(client_venv / "bin" / "convstack"), "bench", "client"]
    command += ["--target", server.target, "--model", MODEL, "--count", "8", "--latency-calls", "3"]

    result = _run([*command, "--out", str(out)], cwd="/")

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["load"]["ok"] == 8
    assert "tensorflow" not in report["codec"]


@pytest.mark.parametrize(
    ("verb", "extra"),
    [
        (["serve", "--help"], "serving"),
        (["train", "--help"], "training"),
        (["k8s", "render", "--help"], "k8s"),
        (["predict", "--target", "TARGET", "--model", MODEL, "PNG"], "images"),
    ],
    ids=["serve", "train", "k8s-render", "predict-images"],
)
def test_a_verb_of_a_missing_extra_exits_2_naming_it(client_venv, server, inputs, verb, extra):
    words = {"PNG": str(inputs["png"]), "TARGET": server.target}
    argv = [words.get(word, word) for word in verb]

    result = _run([str(client_venv / "bin" / "convstack"), *argv], cwd="/")

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert f"convstack[{extra}]" in lines[0]
