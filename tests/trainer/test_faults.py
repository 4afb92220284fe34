"""Training under faults (issue #19): a real `convstack train` signalled or killed in each phase
through the crash points of trainer/crash_points.py ends with the right status, and a rerun with
the same run directory finishes the run exactly once."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convstack.trainer import crash_points
from tests.trainer.fault_helpers import (
    ROOT,
    STEPS_PER_EPOCH,
    STOP_LINE,
    WEIGHT_ATOL,
    error_lines,
    final_weights,
    history_epochs,
    max_weight_difference,
    model_dir_entries,
    train,
)

pytestmark = pytest.mark.slow


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


def sigterm_blocked(pid: int) -> bool:
    """Whether the process has SIGTERM in its blocked mask (how trainer/preemption.py takes it)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def test_a_sigterm_as_soon_as_the_process_takes_it_stops_with_exit_75(tmp_path):
    """The earliest SIGTERM that can end well: right when `convstack train` blocks the signal,
    its first act (before that, the interpreter is still starting and dies of it, 143)."""
    command = [sys.executable, "-m", "convstack.cli", "train", "--data", "digits", "--run-dir",
               str(tmp_path / "run"), "--model-base", str(tmp_path / "models")]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    while not sigterm_blocked(process.pid):
        assert process.poll() is None
        time.sleep(0.002)
    taken = time.monotonic() - started
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)  # a no-hang bound
    stopped = time.monotonic() - started - taken

    assert process.returncode == 75, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert "preempted during start-up" in line and STOP_LINE.search(line), line
    assert not (tmp_path / "run").exists()
    print(f"SIGTERM taken {taken:.3f}s after the exec; exit 75 {stopped:.2f}s after the signal")


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


@pytest.mark.parametrize("replicas", ["1", "2"])
def test_a_run_interrupted_twice_ends_with_the_uninterrupted_runs_weights(tmp_path, replicas):
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

    got = final_weights(broken)
    difference = max_weight_difference(got, final_weights(tmp_path / "straight"))
    print(f"replicas {replicas}: max weight difference {difference:.3g}")
    assert difference <= WEIGHT_ATOL
    assert any(name.startswith("rng/") for name in got)
    assert history_epochs(broken) == [1, 2]
