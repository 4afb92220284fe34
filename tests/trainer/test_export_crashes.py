"""Fault injection into the export (issue #12, defect 9): a real `convstack train` SIGKILLed at
each named step of the export sequence (trainer/crash_points.py), then rerun with the same run
directory, publishes exactly one version; every numeric version loads; no hidden staging
directory is left. And a live exporter's staging directory is never taken for a stale one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from convstack.trainer import crash_points, export
from tests.trainer import export_helpers as helpers

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = ["--conv-blocks", "1", "--filters", "4", "--dense-units", "8", "--dropout", "0"]


def train(tmp_path: Path, *extra: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    """One epoch of the real trainer into tmp_path/models, with tmp_path/run as its run dir."""
    command = [sys.executable, "-m", "convstack.cli", "train", "--data", "digits", "--epochs", "1"]
    command += ["--model-base", str(tmp_path / "models"), "--model-name", "digits"]
    command += ["--run-dir", str(tmp_path / "run"), "--progress", "log", *TINY_RUN, *extra]
    env = {k: v for k, v in os.environ.items() if k != crash_points.ENV}
    if crash_at is not None:
        env[crash_points.ENV] = crash_at
    return subprocess.run(
        command, cwd=ROOT, env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip


def hidden_entries(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if p.name.startswith("."))


def assert_every_version_loads(model_dir: Path) -> None:
    import tensorflow as tf

    for version in export.numeric_versions(model_dir):
        loaded = tf.saved_model.load(str(model_dir / str(version)))
        assert "serving_default" in loaded.signatures


@pytest.mark.parametrize("point", crash_points.EXPORT_POINTS)
def test_a_run_killed_at_any_export_step_publishes_exactly_one_version_on_rerun(tmp_path, point):
    crashed = train(tmp_path, crash_at=point)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]

    rerun = train(tmp_path)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    model_dir = tmp_path / "models" / "digits"
    assert export.numeric_versions(model_dir) == [1]
    assert hidden_entries(model_dir) == []
    assert_every_version_loads(model_dir)
    record = json.loads((tmp_path / "run" / "export.json").read_text())
    assert record["version"] == 1
    assert Path(record["path"]) == model_dir / "1"
    card = json.loads((model_dir / "1" / "assets.extra" / "model_card.json").read_text())
    assert card["training"]["global_steps"] == record["global_step"]


def test_a_rerun_finishes_a_killed_export_of_an_explicit_version(tmp_path):
    """--version refuses an existing version before training, but not the one this run
    directory published before it was killed."""
    crashed = train(tmp_path, "--version", "5", crash_at="exported")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]

    rerun = train(tmp_path, "--version", "5")

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    model_dir = tmp_path / "models" / "digits"
    assert export.numeric_versions(model_dir) == [5]
    assert hidden_entries(model_dir) == []
    assert json.loads((tmp_path / "run" / "export.json").read_text())["version"] == 5
    # Another run directory asking for version 5 is still refused.
    other = train(tmp_path / "other", "--model-base", str(tmp_path / "models"), "--version", "5")
    assert other.returncode == 2 and "already exists" in other.stderr


# --- a live exporter's staging directory -------------------------------------------------------


def test_a_live_exporters_staging_survives_and_a_dead_ones_is_removed(tmp_path):
    paused, staging = helpers.start_paused_export(tmp_path, timeout=300)
    try:
        model = helpers.trained_model()
        model_dir = tmp_path / "tiny"

        # Another exporter meanwhile: it publishes and leaves the live staging alone.
        first = export.export_version(model, **helpers.export_kwargs(tmp_path))
        assert first.version == 1
        assert hidden_entries(model_dir) == [staging.name]
        assert (staging / "saved_model.pb").is_file()
    finally:
        os.kill(paused.pid, signal.SIGKILL)
        paused.wait()

    # Its exporter is dead now: the next export removes what it left.
    second = export.export_version(model, **helpers.export_kwargs(tmp_path))

    assert second.version == 2
    assert hidden_entries(model_dir) == []
    assert export.numeric_versions(model_dir) == [1, 2]
    assert_every_version_loads(model_dir)
