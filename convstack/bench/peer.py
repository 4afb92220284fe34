"""The peer server of `convstack bench serve --peer kserve`: KServe's Python `ModelServer` in a
venv of its own, cached outside the clone, serving the same SavedModel (convstack/bench/
kserve_model.py) on free loopback ports.

Its own venv because KServe 0.21 needs protobuf < 7 and convstack's TensorFlow 2.21 stack runs on
protobuf 7: the two cannot share one. The venv is made once per KServe version
(`<cache>/convstack/peer-kserve-<kserve>`, $XDG_CACHE_HOME or ~/.cache) and reused while its
stamp names the same requirements (TensorFlow's version among them); otherwise it is made anew.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from convstack.common.ports import free_ports
from convstack.serving.process import ServerProcess

log = logging.getLogger(__name__)

KSERVE_VERSION = "0.21.0"
# kserve 0.21's generated messages refuse protobuf 7 (convstack's runtime).
PEER_CONSTRAINTS = ("protobuf<7",)
STAMP = ".convstack-peer-requirements"
MODEL_SCRIPT = Path(__file__).with_name("kserve_model.py")
PEER_START_SECONDS = 180.0
PIP_SECONDS = 1800.0


class PeerSetupError(RuntimeError):
    """The peer's venv could not be made (no network, a failed install)."""


def cache_root() -> Path:
    """$XDG_CACHE_HOME/convstack or ~/.cache/convstack."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convstack"


def requirements(tensorflow_version: str, kserve_version: str = KSERVE_VERSION) -> list[str]:
    """What the peer's venv installs: KServe, the TensorFlow convstack runs, protobuf < 7."""
    return [f"kserve=={kserve_version}", f"tensorflow=={tensorflow_version}", *PEER_CONSTRAINTS]


def venv_dir(kserve_version: str = KSERVE_VERSION) -> Path:
    return cache_root() / f"peer-kserve-{kserve_version}"


def venv_is_ready(path: Path, wanted: list[str]) -> bool:
    """Whether the venv at `path` was made with exactly `wanted` (its stamp) and has a python."""
    stamp = path / STAMP
    return (
        (path / "bin" / "python").exists()
        and stamp.exists()
        and (stamp.read_text().split("\n") == wanted)
    )


def ensure_venv(tensorflow_version: str, kserve_version: str = KSERVE_VERSION) -> Path:
    """The peer venv's python, made (with pip, from the package index) if not cached."""
    path = venv_dir(kserve_version)
    wanted = requirements(tensorflow_version, kserve_version)
    python = path / "bin" / "python"
    if venv_is_ready(path, wanted):
        return python
    log.info("making the peer venv %s (%s): minutes, once", path, " ".join(wanted))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        shutil.rmtree(path)  # made for other requirements, or half made
    steps = [
        [sys.executable, "-m", "venv", str(path)],
        [str(python), "-m", "pip", "install", "--quiet", *wanted],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=PIP_SECONDS)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise PeerSetupError(f"{' '.join(step[:4])} ... failed ({done.returncode}):\n{tail}")
    (path / STAMP).write_text("\n".join(wanted))
    return python


@dataclass
class PeerProcess:
    """kserve_model.py under the peer venv's python; the same targets as ServerProcess."""

    process: subprocess.Popen
    grpc_port: int
    rest_port: int
    log_path: Path

    grpc_target = ServerProcess.grpc_target
    rest_target = ServerProcess.rest_target
    log_tail = ServerProcess.log_tail
    poll_status = ServerProcess.poll_status
    stop = ServerProcess.stop

    @classmethod
    def start(
        cls,
        python: Path,
        model_name: str,
        version_dir: Path,
        log_path: Path,
        *,
        gc_freeze: bool = False,
        threads: int = 1,
    ) -> PeerProcess:
        """Start serving one version; returns at once (see wait_available)."""
        grpc_port, rest_port = free_ports(2)
        command = [
            str(python),
            str(MODEL_SCRIPT),
            f"--model_name={model_name}",
            f"--model_dir={Path(version_dir).resolve()}",
            f"--http_port={rest_port}",
            f"--grpc_port={grpc_port}",
            f"--threads={threads}",
            *(["--gc_freeze"] if gc_freeze else []),
        ]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            )
        return cls(process, grpc_port, rest_port, Path(log_path))

    def wait_available(self, model_name: str, timeout: float = PEER_START_SECONDS) -> None:
        """Poll KServe's v1 model status until it says ready."""
        self.poll_status(
            f"/v1/models/{model_name}",
            lambda status: bool(status.get("ready")),
            server="the KServe peer",
            waiting_for="KServe peer not ready",
            timeout=timeout,
            interval=0.3,
        )
