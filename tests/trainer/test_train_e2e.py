"""`convstack train` end to end in real subprocesses: a 2-replica run that exports a version,
resume after SIGTERM, multi-worker training on loopback, and bad-input exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.loopback import free_ports

pytestmark = pytest.mark.slow

SMALL_MODEL = ["--conv-blocks", "2", "--filters", "8", "--dense-units", "32", "--dropout", "0"]


def convstack(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "convstack.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        **kwargs,
    )


def run(*args: str, timeout: float = 300, env: dict | None = None):
    process = convstack(*args, env=env)
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def train_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        "digits",
        "--model-base",
        str(tmp_path / "models"),
        "--model-name",
        "digits",
        "--run-dir",
        str(tmp_path / "run"),
        "--progress",
        "log",
        *SMALL_MODEL,
        *extra,
    ]


def test_two_replica_run_exports_a_version_that_reloads_and_predicts(tmp_path):
    code, stdout, stderr = run(*train_args(tmp_path, "--replicas", "2", "--epochs", "3"))
    assert code == 0, stderr
    assert "MirroredStrategy with 2 replica(s)" in stderr
    version_dir = tmp_path / "models" / "digits" / "1"
    assert f"exported version 1: {version_dir}" in stdout
    accuracy = float(stdout.split("test accuracy: ")[1].split()[0])
    assert accuracy > 0.8  # chance is 0.1; three epochs of the small model reach ~0.9+

    run_dir = tmp_path / "run"
    assert (run_dir / "learning_curves.png").stat().st_size > 1000
    assert len(json.loads((run_dir / "history.json").read_text())) == 3
    assert list((run_dir / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert list((run_dir / "checkpoints").glob("ckpt-*.index"))

    card = json.loads((version_dir / "assets.extra" / "model_card.json").read_text())
    assert card["training"]["replicas"] == 2
    assert card["test_metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert (version_dir / "assets.extra" / "tf_serving_warmup_requests").exists()

    import tensorflow as tf

    from convstack.trainer.data import load_dataset

    images, labels = load_dataset("digits").arrays("test", limit=100)
    loaded = tf.saved_model.load(str(version_dir))
    outputs = loaded.signatures["serving_default"](images=tf.constant(images))
    assert outputs["probabilities"].shape == (100, 10)
    assert np.mean(outputs["classes"].numpy() == labels) > 0.8


def wait_for(predicate, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early: {process.communicate()[1][-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_sigterm_checkpoints_and_exits_75_then_resume_ends_at_the_same_step(tmp_path):
    from convstack.trainer.data import load_dataset

    # Batch 16 -> ~78 steps per epoch, 3 epochs; slow enough to stop mid-run.
    total = 3 * (load_dataset("digits").info.split_sizes["train"] // 16)
    args = train_args(
        tmp_path,
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--checkpoint-every",
        "10",
        "--replicas",
        "2",
    )
    process = convstack(*args)
    checkpoints = tmp_path / "run" / "checkpoints"
    wait_for(lambda: len(list(checkpoints.glob("ckpt-*.index"))) >= 2, 240, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)  # a hang guard, not a speed requirement
    assert process.returncode == 75, stderr
    assert "preempted at step" in stderr
    stopped_step = int(stderr.split("preempted at step ")[1].split()[0])
    assert 0 < stopped_step < total
    # It stopped where the signal found it, saving that step, not at a later scheduled one.
    assert (checkpoints / f"ckpt-{stopped_step}.index").exists()
    assert not (tmp_path / "models" / "digits").exists()

    code, stdout, stderr = run(*args)
    assert code == 0, stderr
    assert f"resumed from {checkpoints}/ckpt-{stopped_step}" in stderr
    assert f"{total} steps" in stdout
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["step"] == total
    card_path = tmp_path / "models" / "digits" / "1" / "assets.extra" / "model_card.json"
    assert json.loads(card_path.read_text())["training"]["global_steps"] == total

    # Rerunning a finished run neither trains nor publishes the same training again.
    code, stdout, stderr = run(*args)
    assert code == 0, stderr
    assert "already exported version 1" in stderr
    assert sorted(p.name for p in (tmp_path / "models" / "digits").iterdir()) == ["1"]


def test_multi_worker_training_on_loopback_exports_exactly_one_version(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(
            convstack(
                *train_args(tmp_path, "--epochs", "2", "--checkpoint-every", "10"),
                env={"TF_CONFIG": json.dumps(tf_config)},
            )
        )
    results = [(p, *p.communicate(timeout=400)) for p in processes]
    for process, _, stderr in results:
        assert process.returncode == 0, stderr[-3000:]
        assert "MultiWorkerMirroredStrategy with 2 replica(s)" in stderr
    chief_stdout = results[0][1]
    assert "exported version 1" in chief_stdout
    assert "exported version" not in results[1][1]
    assert [p.name for p in (tmp_path / "models" / "digits").iterdir()] == ["1"]
    run_dir = tmp_path / "run"
    assert not list(run_dir.glob(".scratch-*")), "non-chief scratch directories must be removed"
    assert list((run_dir / "checkpoints").glob("ckpt-*.index"))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--data", "npz:/nonexistent/mnist.npz"], "/nonexistent/mnist.npz"),
        (["--epochs", "0"], "epochs (--epochs)"),
        (["--data", "tfrecord:/nonexistent/*.tfrecord"], "/nonexistent/*.tfrecord"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, extra, expected):
    code, _, stderr = run(*train_args(tmp_path, *extra), timeout=120)
    assert code == 2
    error_lines = [
        line for line in stderr.splitlines() if line.startswith("convstack train: error:")
    ]
    assert len(error_lines) == 1 and expected in error_lines[0], stderr[-2000:]


def test_existing_version_is_never_overwritten(tmp_path):
    existing = tmp_path / "models" / "digits" / "1"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("original")
    code, _, stderr = run(*train_args(tmp_path, "--epochs", "1", "--version", "1"))
    assert code == 2
    assert str(existing) in stderr
    assert (existing / "keep.txt").read_text() == "original"
    assert sorted(p.name for p in existing.parent.iterdir()) == ["1"]


def test_mixed_precision_run_with_tflite_export(tmp_path):
    code, _, stderr = run(
        *train_args(tmp_path, "--epochs", "2", "--replicas", "2", "--mixed-precision", "--tflite")
    )
    assert code == 0, stderr[-3000:]
    # TFLite's own INFO line on its XNNPACK delegate, which ignores TF_CPP_MIN_LOG_LEVEL.
    assert "XNNPACK" not in stderr
    version_dir = tmp_path / "models" / "digits" / "1"
    card = json.loads((version_dir / "assets.extra" / "model_card.json").read_text())
    assert card["training"]["precision_policy"] == "mixed_bfloat16"
    tflite = card["tflite"]
    # --tflite alone: float32, in the version directory where TF Serving looks for it.
    assert (version_dir / "model.tflite").stat().st_size == tflite["size_bytes"]
    assert not (version_dir / "assets.extra" / "model.tflite").exists()
    assert tflite["quantization"] == "float32"
    # Two epochs reach well above chance (0.1); the float32 TFLite model of the bfloat16 one
    # (a float32 copy, same weights) stays close.
    assert card["test_metrics"]["accuracy"] > 0.5
    assert tflite["saved_model_test_accuracy"] == pytest.approx(card["test_metrics"]["accuracy"])
    assert abs(tflite["test_accuracy"] - tflite["saved_model_test_accuracy"]) < 0.1
    # The Keras-native copy of a mixed-precision model trained on two replicas loads too.
    assert (version_dir / "assets.extra" / "model.keras").stat().st_size > 0
