"""Conformance fixtures: a real server process on free loopback ports, serving versions that
the trainer exported, driven only through raw tensorflow_serving.apis stubs and plain HTTP.

Every server fixture is parametrised over backends: the embedded server always, and the real
`tensorflow_model_server` when CONVSTACK_TFSERVING_BINARY points at one (skipped otherwise)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from convstack.serving.launcher import BINARY_ENV
from convstack.serving.process import ServerProcess

MODEL = "tiny"


def write_config(path: Path, models: list[tuple[str, Path]], extra: str = "") -> Path:
    """A models.config; `extra` is inserted into the first model's block (policy, labels)."""
    blocks = []
    for index, (name, base_path) in enumerate(models):
        body = f'name: "{name}" base_path: "{base_path}" model_platform: "tensorflow" '
        blocks.append(f"config {{ {body}{extra if index == 0 else ''} }}")
    path.write_text("model_config_list {\n  " + "\n  ".join(blocks) + "\n}\n")
    return path


@dataclass
class Server(ServerProcess):
    """A server process, reached through raw TF Serving stubs and plain HTTP."""

    backend: str = "embedded"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def prediction(self):
        return prediction_service_pb2_grpc.PredictionServiceStub(self.channel())

    def models(self):
        return model_service_pb2_grpc.ModelServiceStub(self.channel())

    def rest(self, method: str, path: str, body=None, timeout: float = 30):
        """(status, parsed JSON or text) of a plain HTTP request."""
        data = (
            None
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.rest_port}{path}", data=data, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_available(self, name: str = MODEL, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        stub = self.models()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}:\n{self.log()}")
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = name
            try:
                reply = stub.GetModelStatus(request, timeout=2)
                if any(s.state == 30 for s in reply.model_version_status):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{name} never became AVAILABLE:\n{self.log()}")


BACKENDS = ["embedded", "tfserving"]


def available_backend(name: str) -> str:
    """`name`, or a skip when it is the real TF Serving and none is installed."""
    if name == "tfserving" and not os.environ.get(BINARY_ENV):
        pytest.skip(f"real TF Serving not available: set {BINARY_ENV} to a tensorflow_model_server")
    return name


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return available_backend(request.param)


@pytest.fixture
def start_server(tmp_path, backend):
    """start_server(flags, wait_for=MODEL) -> Server; every server is stopped afterwards."""
    started: list[Server] = []

    def start(flags: list[str], wait_for: str | None = MODEL) -> Server:
        program = [os.environ[BINARY_ENV]] if backend == "tfserving" else None
        log_path = tmp_path / f"server-{len(started)}.log"
        server = Server.launch(flags, log_path, program=program)
        server.backend = backend
        started.append(server)
        if wait_for:
            server.wait_available(wait_for)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def monitoring_file(tmp_path) -> Path:
    path = tmp_path / "monitoring.config"
    path.write_text(
        'prometheus_config {\n  enable: true,\n  path: "/monitoring/prometheus/metrics"\n}\n'
    )
    return path


# TF Serving's own test models and configs (../shared/tfserving-upstream/testdata next to the
# checkout); CONVSTACK_TFSERVING_TESTDATA points elsewhere. Tests copy them, never write there.
TESTDATA_ENV = "CONVSTACK_TFSERVING_TESTDATA"
_TESTDATA_CANDIDATES = (
    Path(__file__).resolve().parents[3].parent / "shared" / "tfserving-upstream" / "testdata",
    Path("/work/shared/tfserving-upstream/testdata"),
)


def upstream_testdata() -> Path:
    """Where TF Serving's test models are; skips (saying where it looked) when they are not."""
    candidates = [Path(os.environ[TESTDATA_ENV])] if os.environ.get(TESTDATA_ENV) else []
    candidates += _TESTDATA_CANDIDATES
    for candidate in candidates:
        if (candidate / "saved_model_half_plus_two_cpu").is_dir():
            return candidate
    pytest.skip(
        "TF Serving's test models not found (looked in "
        f"{', '.join(map(str, candidates))}; set {TESTDATA_ENV})"
    )


@pytest.fixture(scope="session")
def upstream_models(tmp_path_factory) -> Path:
    """A private copy of TF Serving's testdata directory."""
    copy = tmp_path_factory.mktemp("tfserving-testdata") / "testdata"
    shutil.copytree(upstream_testdata(), copy)
    return copy


def model_config(entries: dict[str, tuple[Path, str]]) -> str:
    blocks = [
        f'config {{ name: "{name}" base_path: "{path}" model_platform: "tensorflow" {extra} }}'
        for name, (path, extra) in entries.items()
    ]
    return "model_config_list {\n  " + "\n  ".join(blocks) + "\n}\n"


def launch(tmp_path: Path, backend: str, flags: list[str], name: str) -> Server:
    program = [os.environ[BINARY_ENV]] if backend == "tfserving" else None
    server = Server.launch(flags, tmp_path / f"{name}.log", program=program)
    server.backend = backend
    return server


@contextlib.contextmanager
def serving(
    root: Path, backend: str, models: dict[str, tuple[Path, str]], flags=(), name="server"
) -> Iterator[Server]:
    """A server of `models` (name -> (base path, extra config)) until the block ends, every
    model AVAILABLE before it starts."""
    config = root / f"{name}.config"
    config.write_text(model_config(models))
    server = launch(root, backend, [f"--model_config_file={config}", *flags], name)
    try:
        for model in models:
            server.wait_available(model)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def upstream_backend(request) -> str:
    """The backend of a module's shared server (one server per module and backend)."""
    return available_backend(request.param)
