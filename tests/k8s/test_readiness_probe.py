"""The serving Deployment's readiness probe, exactly as rendered, run against a real
TF-Serving-compatible server (the embedded one, in a subprocess on loopback): ready only while
the model has an AVAILABLE version, although GET /v1/models/NAME answers 200 in other states."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.k8s.manifests import container, one
from tests.loopback import EMBEDDED_SERVE, free_ports
from tests.trainer import export_helpers

pytestmark = pytest.mark.slow

MODEL = "tiny"  # export_helpers' model name


@dataclass
class Server:
    process: subprocess.Popen
    rest_port: int
    config: Path
    model_dir: Path
    log: Path

    def status(self, model: str = MODEL) -> tuple[int, dict | str]:
        url = f"http://127.0.0.1:{self.rest_port}/v1/models/{model}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_for_states(self, states: set[str], timeout: float = 120) -> dict:
        """Poll until the model's versions are exactly in `states`; the last status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited:\n{self.log.read_text()}")
            try:
                code, body = self.status()
            except OSError:  # not listening yet
                code, body = None, None
            if code == 200 and {v["state"] for v in body["model_version_status"]} == states:
                return body
            time.sleep(0.2)
        raise AssertionError(f"model never reached {states}:\n{self.log.read_text()}")


def write_models_config(path: Path, base_path: Path, version: int) -> None:
    """Serve exactly `version`; replaced atomically, as the polling server must never read half
    a file."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(
        f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{base_path}" '
        f'model_platform: "tensorflow" '
        f"model_version_policy {{ specific {{ versions: {version} }} }} }} }}\n"
    )
    os.replace(temporary, path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """<base>/tiny with version 1, exported by the trainer."""
    from convstack.trainer.export import export_version

    base = tmp_path_factory.mktemp("models")
    result = export_version(export_helpers.trained_model(), **export_helpers.export_kwargs(base))
    return result.path.parent


def start_server(directory: Path, model_dir: Path) -> Server:
    """A server on free loopback ports serving version 1 of `model_dir`, once AVAILABLE."""
    grpc_port, rest_port = free_ports(2)
    config = directory / "models.config"
    write_models_config(config, model_dir, version=1)
    log = directory / "server.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [
                *EMBEDDED_SERVE,
                f"--port={grpc_port}",
                f"--rest_api_port={rest_port}",
                f"--model_config_file={config}",
                "--model_config_file_poll_wait_seconds=0.2",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
    server = Server(process, rest_port, config, model_dir, log)
    try:
        server.wait_for_states({"AVAILABLE"})
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory, model_dir):
    """One server for the tests that only read its state."""
    server = start_server(tmp_path_factory.mktemp("server"), model_dir)
    yield server
    stop_server(server)


@pytest.fixture
def own_server(tmp_path, model_dir):
    """A server of the test's own, whose config the test may change."""
    server = start_server(tmp_path, model_dir)
    yield server
    stop_server(server)


@pytest.fixture
def probe(rendered):
    """probe(rest_port, model) -> exit status of the rendered readiness probe's command, with
    its port and model arguments pointed at the test server."""
    deployment = one(rendered["local"], "Deployment", "convstack-serving")
    command = container(deployment, "tensorflow-serving")["readinessProbe"]["exec"]["command"]
    if not Path(command[0]).exists():
        pytest.skip(f"{command[0]} is not installed here; the probe needs it (as in the image)")

    def run(rest_port: int, model: str = MODEL) -> int:
        # The timeout only stops a hung probe; the kubelet would count it as a failure too.
        result = subprocess.run(
            [*command[:4], str(rest_port), model], capture_output=True, timeout=60, check=False
        )
        return result.returncode

    return run


def test_ready_when_the_model_is_available(shared_server, probe):
    assert probe(shared_server.rest_port) == 0


def test_not_ready_for_a_model_the_server_does_not_have(shared_server, probe):
    assert shared_server.status("absent")[0] == 404
    assert probe(shared_server.rest_port, "absent") != 0


def test_not_ready_when_nothing_listens(probe):
    (closed_port,) = free_ports(1)
    assert probe(closed_port) != 0


def test_not_ready_when_the_status_is_200_but_no_version_is_available(own_server, probe):
    server = own_server
    # Aspire a version that does not exist: version 1 unloads and stays listed as END.
    write_models_config(server.config, server.model_dir, version=2)
    body = server.wait_for_states({"END"})
    assert server.status()[0] == 200  # what an httpGet probe would have taken for "ready"
    assert body["model_version_status"][0]["version"] == "1"
    assert probe(server.rest_port) != 0
