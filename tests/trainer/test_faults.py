"""Training under faults (issue #19): a real `convstack train` signalled or killed in each phase
through the crash points of trainer/crash_points.py ends with the right status, and a rerun with
the same run directory finishes the run exactly once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convstack.trainer import crash_points
from tests.loopback import free_ports

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# One Conv2D block of 4 filters: a step costs next to nothing, so a run is mostly start-up.
TINY_RUN = ["--conv-blocks", "1", "--filters", "4", "--dense-units", "8"]
# digits with batch 64: 1257 training images, 19 steps per epoch.
STEPS_PER_EPOCH = 19
STOP_LINE = re.compile(r"preempted (?:during|at) .*\((SIGTERM) ([0-9.]+)s ago\)")


def train(
    tmp_path: Path, *extra: str, crash_at: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """The real trainer on digits into tmp_path/models, run dir tmp_path/run."""
    command = [sys.executable, "-m", "convstack.cli", "train", "--data", "digits"]
    command += ["--model-base", str(tmp_path / "models"), "--model-name", "digits"]
    command += ["--run-dir", str(tmp_path / "run"), "--progress", "log", *TINY_RUN, *extra]
    env = {k: v for k, v in os.environ.items() if k != crash_points.ENV}
    if crash_at is not None:
        env[crash_points.ENV] = crash_at
    return subprocess.run(
        command, cwd=ROOT, env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("convstack train: error:")]


def model_dir_entries(tmp_path: Path) -> list[str]:
    model_dir = tmp_path / "models" / "digits"
    return sorted(p.name for p in model_dir.iterdir()) if model_dir.exists() else []


def history_epochs(tmp_path: Path) -> list[int]:
    return [r["epoch"] for r in json.loads((tmp_path / "run" / "history.json").read_text())]


# --- (3) a SIGTERM in any phase is a clean stop with exit 75 --------------------------------

PHASES = [
    ("started", "start-up"),
    ("strategy-created", "start-up"),
    ("data-loaded", "data loading"),
    ("restored", "start-up"),
    ("trained", "evaluation"),
    ("evaluated", "evaluation"),
    ("staging-created", "export"),
]


@pytest.mark.parametrize(("point", "phase"), PHASES, ids=[p for p, _ in PHASES])
def test_a_sigterm_in_any_phase_stops_cleanly_with_exit_75(tmp_path, point, phase):
    stopped = train(tmp_path, "--epochs", "1", crash_at=f"{point}:SIGTERM")

    assert stopped.returncode == 75, stopped.stderr[-3000:]
    (line,) = error_lines(stopped.stderr)
    assert f"preempted during {phase}" in line and STOP_LINE.search(line), line
    print(f"SIGTERM at {point}: stopped {STOP_LINE.search(line).group(2)}s after it")
    # Nothing half-made: no staging directory and no version.
    assert model_dir_entries(tmp_path) == []


def test_a_sigterm_in_the_export_then_a_rerun_publishes_exactly_one_version(tmp_path):
    stopped = train(tmp_path, "--epochs", "1", crash_at="staged:SIGTERM")
    # The staged point is past the last check before the rename: the version is published and
    # recorded, and the run still ends as preempted, like every SIGTERM.
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert model_dir_entries(tmp_path) == ["1"]

    rerun = train(tmp_path, "--epochs", "1")

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already exported version 1" in rerun.stderr
    assert model_dir_entries(tmp_path) == ["1"]
    assert history_epochs(tmp_path) == [1]


# --- (2) an epoch's record and its checkpoint are one unit -----------------------------------


def test_a_sigterm_at_an_epoch_end_keeps_that_epochs_record(tmp_path):
    """The issue's case: SIGTERM on the last step of epoch 1 lost its history record."""
    args = ("--epochs", "2", "--checkpoint-every", "10", "--no-export")
    stopped = train(tmp_path, *args, crash_at=f"{crash_points.step_point(STEPS_PER_EPOCH)}:SIGTERM")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert f"preempted at step {STEPS_PER_EPOCH} " in stopped.stderr

    rerun = train(tmp_path, *args)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert history_epochs(tmp_path) == [1, 2]


def test_a_kill_between_an_epochs_record_and_its_checkpoint_counts_the_epoch_once(tmp_path):
    args = ("--epochs", "2", "--checkpoint-every", "10", "--no-export")
    killed = train(tmp_path, *args, crash_at="epoch-recorded")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert history_epochs(tmp_path) == [1]
    # (7) What a save killed mid-write leaves: its temp folder and data without an index.
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "ckpt-15_temp").mkdir()
    (checkpoints / "ckpt-15_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
    (checkpoints / "ckpt-15.data-00000-of-00001").write_bytes(b"x")

    rerun = train(tmp_path, *args)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr and "(step 10)" in rerun.stderr
    assert not list(checkpoints.glob("ckpt-15*"))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [(r["epoch"], r["step"]) for r in history] == [(1, STEPS_PER_EPOCH), (2, 38)]


# --- (6) settings on resume ------------------------------------------------------------------


def test_a_resume_refuses_fixed_settings_with_exit_2_and_one_line_naming_them(tmp_path):
    first = train(tmp_path, "--epochs", "1", "--no-export")
    assert first.returncode == 0, first.stderr[-3000:]
    identity = (tmp_path / "run" / "run.json").read_text()

    refused = {
        "filters": train(tmp_path, "--epochs", "2", "--no-export", "--filters", "8"),
        "learning-rate": train(tmp_path, "--epochs", "2", "--no-export", "--learning-rate", "0.5"),
    }
    (tmp_path / "run" / "run.json").unlink()  # as in a run directory from before run.json
    refused["checkpoint"] = train(tmp_path, "--epochs", "2", "--no-export", "--filters", "8")
    refused["checkpoint-learning-rate"] = train(
        tmp_path, "--epochs", "2", "--no-export", "--learning-rate", "0.5"
    )

    for name, result in refused.items():
        assert result.returncode == 2, (name, result.stderr[-3000:])
        (line,) = error_lines(result.stderr)
        assert "Traceback" not in result.stderr, name
        assert {
            "filters": "--filters 8 (the run has 4)",
            "learning-rate": "--learning-rate 0.5 (the run has 0.001)",
            "checkpoint": "checkpoint does not fit the model",
            "checkpoint-learning-rate": "--learning-rate 0.5: the run's checkpoint",
        }[name] in line, line
    # A refused resume records nothing: the original settings still resume.
    resumed = train(tmp_path, "--epochs", "2", "--no-export")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == json.loads(identity)


# --- (1) a resume reproduces the run ---------------------------------------------------------

# Same process layout and kernels either way, so the weights should agree to the bit; the bound
# leaves room for float reassociation only (dropout masks that differ move weights by ~1e-2).
WEIGHT_ATOL = 1e-6


def final_weights(tmp_path: Path) -> dict:
    import tensorflow as tf

    # Everything the last checkpoint holds (weights, optimizer slots, random state) but its
    # bookkeeping: the save counter counts the saves, which an interrupted run makes more of.
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints"))
    names = [n for n in reader.get_variable_to_shape_map() if not n.startswith(("_", "save_"))]
    return {name: reader.get_tensor(name) for name in names}


@pytest.mark.parametrize("replicas", ["1", "2"])
def test_a_run_interrupted_twice_ends_with_the_uninterrupted_runs_weights(tmp_path, replicas):
    import numpy as np

    # Dropout on (the model's default 0.25): its masks are the random state to restore.
    args = ("--epochs", "2", "--checkpoint-every", "5", "--no-export", "--replicas", replicas)
    straight = train(tmp_path / "straight", *args)
    assert straight.returncode == 0, straight.stderr[-3000:]

    broken = tmp_path / "broken"
    for step in (7, STEPS_PER_EPOCH + 7):  # mid-epoch, off the checkpoint grid, both epochs
        stopped = train(broken, *args, crash_at=f"{crash_points.step_point(step)}:SIGTERM")
        assert stopped.returncode == 75, stopped.stderr[-3000:]
        assert f"preempted at step {step} " in stopped.stderr
    resumed = train(broken, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = final_weights(tmp_path / "straight"), final_weights(broken)
    assert sorted(got) == sorted(expected)
    differences = {n: float(np.max(np.abs(got[n] - expected[n]))) for n in expected}
    print(f"replicas {replicas}: max weight difference {max(differences.values()):.3g}")
    assert max(differences.values()) <= WEIGHT_ATOL, differences
    assert any(name.startswith("rng/") for name in got)
    assert history_epochs(broken) == [1, 2]


# --- (4)/(5) an absent or lost peer ends a worker in bounded time with one line --------------


def start_worker(
    tmp_path: Path, workers: list[str], index: int, *extra: str, crash_at: str | None = None
) -> subprocess.Popen:
    tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    command = [sys.executable, "-m", "convstack.cli", "train", "--data", "digits"]
    command += ["--model-base", str(tmp_path / "models"), "--run-dir", str(tmp_path / "run")]
    command += ["--progress", "log", *TINY_RUN, *extra]
    env = {k: v for k, v in os.environ.items() if k != crash_points.ENV}
    env.update(TF_CONFIG=json.dumps(tf_config), TF_CPP_MIN_LOG_LEVEL="2")
    if crash_at is not None:
        env[crash_points.ENV] = crash_at
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_a_worker_whose_chief_never_starts_exits_1_within_the_cluster_wait(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    started = time.monotonic()
    worker = start_worker(tmp_path, workers, 1, "--epochs", "1", "--cluster-wait-seconds", "5")
    _, stderr = worker.communicate(timeout=300)  # a no-hang bound, not a timing threshold
    elapsed = time.monotonic() - started

    assert worker.returncode == 1, stderr[-3000:]
    assert f"waiting for worker:0 at {workers[0]}; exiting 1 if it has not formed" in stderr
    print(f"absent chief: exit {worker.returncode} after {elapsed:.1f}s (wait 5s)")


def test_losing_a_worker_ends_the_other_with_one_line_naming_it(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    args = ("--epochs", "30", "--checkpoint-every", "5", "--no-export")
    chief = start_worker(tmp_path, workers, 0, *args)
    other = start_worker(tmp_path, workers, 1, *args)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("ckpt-*.index")) and time.monotonic() < deadline:
        assert chief.poll() is None and other.poll() is None, chief.communicate()[1][-3000:]
        time.sleep(0.2)
    killed_at = time.monotonic()
    other.kill()
    other.wait()
    _, stderr = chief.communicate(timeout=300)  # a no-hang bound
    detected = time.monotonic() - killed_at

    assert chief.returncode == 1, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert "lost contact with worker:1" in line, line
    assert "Traceback" not in stderr
    print(f"lost worker: chief exit {chief.returncode} {detected:.1f}s after the kill")


def test_a_sigterm_to_one_of_two_workers_stops_both_with_75_and_the_rerun_finishes(tmp_path):
    """The workers agree to stop at the same step, so one worker's SIGTERM is both's stop."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    args = ("--epochs", "2", "--checkpoint-every", "5")
    signalled = crash_points.step_point(STEPS_PER_EPOCH + 3)
    first = [start_worker(tmp_path, workers, 0, *args, crash_at=f"{signalled}:SIGTERM")]
    first.append(start_worker(tmp_path, workers, 1, *args))
    for worker in first:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 75, stderr[-3000:]
        assert f"preempted at step {STEPS_PER_EPOCH + 3} " in stderr

    second = [start_worker(tmp_path, workers, index, *args) for index in (0, 1)]
    for worker in second:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-3000:]

    assert history_epochs(tmp_path) == [1, 2]
    assert model_dir_entries(tmp_path) == ["1"]
    assert not list((tmp_path / "run").glob(".scratch-*"))
