"""A virtualenv with another TensorFlow release, made once and cached outside the clone (not a
test module): ~/.cache/convstack/tf-venvs/tensorflow-MINOR, kept by version, complete only
once its stamp file is written (an interrupted install is redone)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(
    os.environ.get("CONVSTACK_TF_VENVS", Path.home() / ".cache" / "convstack" / "tf-venvs")
)


class EnvironmentUnavailable(RuntimeError):
    """The venv could not be made (no index, say); the message says why."""


def requirements(minor: str) -> list[str]:
    """TensorFlow and TF Serving's Python messages (the warmup records' PredictionLog) of one
    minor release."""
    return [f"tensorflow=={minor}.*", f"tensorflow-serving-api=={minor}.*"]


def python_with_tensorflow(minor: str) -> tuple[Path, float]:
    """The venv's python, and the seconds spent making it (0 when it was cached)."""
    directory = CACHE / f"tensorflow-{minor}"
    python = directory / "bin" / "python"
    stamp = directory / ".complete"
    wanted = "\n".join(requirements(minor))
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"tensorflow-{minor}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one xdist worker or session makes it; others wait
        if stamp.is_file() and stamp.read_text() == wanted and python.exists():
            return python, 0.0
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(directory)], check=True)
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *requirements(minor)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if install.returncode != 0:
            last = (install.stderr.strip().splitlines() or ["no output"])[-1]
            raise EnvironmentUnavailable(f"pip install {' '.join(requirements(minor))}: {last}")
        stamp.write_text(wanted)
        return python, time.monotonic() - started
