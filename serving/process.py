"""A `convstack serve --backend=embedded` subprocess on free loopback ports: started, waited for,
stopped with SIGTERM. Used by the demo, the serving benchmark and the tests."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from convstack.common.ports import free_ports

log = logging.getLogger(__name__)

SERVER_START_SECONDS = 180.0
# The embedded server, bound to loopback only.
EMBEDDED_SERVE = [
    sys.executable, "-m", "convstack.cli", "serve", "--backend=embedded", "--host=127.0.0.1",
]  # fmt: skip


class ServerProcessError(RuntimeError):
    """The server exited early or never made its model AVAILABLE; the message has its log."""


@dataclass
class ServerProcess:
    """A `convstack serve --backend=embedded` subprocess on free loopback ports."""

    process: subprocess.Popen
    grpc_port: int
    rest_port: int
    log_path: Path

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_target(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @classmethod
    def start(cls, model_name: str, model_base_path: Path, log_path: Path, flags=()):
        """Start serving one model; returns at once (see wait_available)."""
        model_flags = [
            f"--model_name={model_name}",
            f"--model_base_path={Path(model_base_path).resolve()}",
        ]
        return cls.launch([*model_flags, *flags], log_path)

    @classmethod
    def start_with_config(cls, config_path: Path, log_path: Path, flags=(), backend="embedded"):
        """Start serving the models of a models.config; `backend` "auto" runs the real TF
        Serving when it is installed. Returns at once (see wait_available)."""
        config_flag = f"--model_config_file={Path(config_path).resolve()}"
        return cls.launch([config_flag, *flags], log_path, backend=backend)

    @classmethod
    def launch(cls, flags, log_path: Path, backend: str = "embedded", ports=None, program=None):
        """`convstack serve` with `flags` on free (or the given) loopback ports; `program` (say
        a `tensorflow_model_server` binary) runs instead of `convstack serve`."""
        grpc_port, rest_port = ports or free_ports(2)
        serve = [a if a != "--backend=embedded" else f"--backend={backend}" for a in EMBEDDED_SERVE]
        ports_flags = [f"--port={grpc_port}", f"--rest_api_port={rest_port}"]
        command = [*(program or serve), *ports_flags, *flags]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            )
        return cls(process, grpc_port, rest_port, Path(log_path))

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_available(self, model_name: str, timeout: float = SERVER_START_SECONDS) -> None:
        """Poll the REST status until a version is AVAILABLE (ServerProcessError if it exits
        or never gets there)."""

        def available(status: dict) -> bool:
            return "AVAILABLE" in [s["state"] for s in status["model_version_status"]]

        self.poll_status(
            f"/v1/models/{model_name}",
            available,
            server="the server",
            waiting_for=f"{model_name} not AVAILABLE",
            timeout=timeout,
        )

    def poll_status(
        self, path: str, ready, *, server: str, waiting_for: str, timeout: float, interval=0.2
    ) -> None:
        """GET `path` on the REST port until `ready(its JSON)` is true; ServerProcessError
        naming `server` if the process exits, or `waiting_for` after `timeout` seconds."""
        url = f"{self.rest_target}{path}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerProcessError(
                    f"{server} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if ready(json.load(response)):
                        return
            except (OSError, ValueError, KeyError):
                pass  # not listening yet, or still loading
            time.sleep(interval)
        raise ServerProcessError(f"{waiting_for} after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit in `timeout` s. The exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.error("server pid %d ignored SIGTERM for %.0f s", self.process.pid, timeout)
                self.process.kill()
                self.process.wait()
        return self.process.returncode
