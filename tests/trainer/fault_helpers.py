"""A real `convstack train` on digits as the trainer's fault tests run it (not a test module):
one worker or several on loopback (TF_CONFIG), with a crash point (trainer/crash_points.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from convstack.trainer import crash_points

ROOT = Path(__file__).resolve().parents[2]
# One Conv2D block of 4 filters: a step costs next to nothing, so a run is mostly start-up.
TINY_RUN = ["--conv-blocks", "1", "--filters", "4", "--dense-units", "8"]
# digits with batch 64: 1257 training images, 19 steps per epoch.
STEPS_PER_EPOCH = 19
STOP_LINE = re.compile(r"preempted (?:during|at) .*\((SIGTERM) ([0-9.]+)s ago\)")
ERROR_PREFIX = "convstack train: error:"


def _env(crash_at: str | None, tf_config: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (crash_points.ENV, "TF_CONFIG")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if crash_at is not None:
        env[crash_points.ENV] = crash_at
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def train_command(tmp_path: Path, *extra: str) -> list[str]:
    """The trainer on digits into tmp_path/models, run dir tmp_path/run."""
    command = [sys.executable, "-m", "convstack.cli", "train", "--data", "digits"]
    command += ["--model-base", str(tmp_path / "models"), "--model-name", "digits"]
    return [*command, "--run-dir", str(tmp_path / "run"), "--progress", "log", *TINY_RUN, *extra]


def train(
    tmp_path: Path, *extra: str, crash_at: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """One single-worker run, to its end."""
    return subprocess.run(
        train_command(tmp_path, *extra), cwd=ROOT, env=_env(crash_at), capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


def start_worker(
    tmp_path: Path, workers: list[str], index: int, *extra: str, crash_at: str | None = None
) -> subprocess.Popen:
    """Worker `index` of the loopback cluster `workers` (HOST:PORT each), started."""
    tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    return subprocess.Popen(
        train_command(tmp_path, *extra), cwd=ROOT, env=_env(crash_at, tf_config),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]


def model_dir_entries(tmp_path: Path) -> list[str]:
    model_dir = tmp_path / "models" / "digits"
    return sorted(p.name for p in model_dir.iterdir()) if model_dir.exists() else []


def history_epochs(tmp_path: Path) -> list[int]:
    return [r["epoch"] for r in json.loads((tmp_path / "run" / "history.json").read_text())]


# Same process layout and kernels either way, so the weights should agree to the bit; the bound
# leaves room for float reassociation only (dropout masks that differ move weights by ~1e-2).
WEIGHT_ATOL = 1e-6


def final_weights(tmp_path: Path) -> dict:
    """Everything the last checkpoint holds (weights, optimizer slots, random state) but its
    bookkeeping: the save counter counts the saves, which an interrupted run makes more of."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints"))
    names = [n for n in reader.get_variable_to_shape_map() if not n.startswith(("_", "save_"))]
    return {name: reader.get_tensor(name) for name in names}


def max_weight_difference(got: dict, expected: dict) -> float:
    import numpy as np

    assert sorted(got) == sorted(expected)
    return max(float(np.max(np.abs(got[n] - expected[n]))) for n in expected)
