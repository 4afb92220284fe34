"""Client test fixtures: real embedded servers in subprocesses on free loopback ports (serving
versions the trainer exported), and a small scripted gRPC server in-process for what the
embedded server cannot be told to do (fail on purpose, echo call metadata)."""

from __future__ import annotations

import re
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from convstack.client.tensors import to_ndarray, to_tensor_proto
from tests.loopback import free_ports
from tests.serving.conformance.conftest import Server
from tests.serving.helpers import make_repository
from tests.trainer import export_helpers

MODEL = "tiny"
READY_LINE = "convstack serve: ready"
MONITORING = 'prometheus_config {\n  enable: true,\n  path: "/monitoring/prometheus/metrics"\n}\n'
_REQUEST_COUNT = re.compile(
    r'^:tensorflow:serving:request_count\{model_name="([^"]*)",status="([^"]*)"\} (\S+)$', re.M
)


def images(count: int, seed: int = 7) -> np.ndarray:
    """float32 [count, 28, 28, 1] images of the tiny model's synthetic classes."""
    return export_helpers.synthetic_data(count, seed)[0]


def config_text(base_path: Path, policy: str = "all {}", labels: dict | None = None) -> str:
    """A models.config for the tiny model with a version policy and labels."""
    label_text = " ".join(
        f'version_labels {{ key: "{key}" value: {value} }}' for key, value in (labels or {}).items()
    )
    return (
        f'model_config_list {{ config {{ name: "{MODEL}" base_path: "{base_path}" '
        f'model_platform: "tensorflow" model_version_policy {{ {policy} }} {label_text} }} }}\n'
    )


@dataclass
class ModelServer(Server):
    """A started server, plus the repository and config it was started with (if any)."""

    base_path: Path | None = None
    config_text: str = ""


def launch(directory: Path, flags: list[str], grpc_port: int | None = None) -> ModelServer:
    """Start `convstack serve` (embedded) on loopback; returns at once."""
    directory.mkdir(parents=True, exist_ok=True)
    grpc_port = grpc_port or free_ports(1)[0]
    rest_port = free_ports(1)[0]
    monitoring = directory / "monitoring.config"
    monitoring.write_text(MONITORING)
    log_path = directory / f"server-{grpc_port}.log"
    return ModelServer.launch(
        [f"--monitoring_config_file={monitoring}", *flags], log_path, ports=(grpc_port, rest_port)
    )


def wait_ready(server: ModelServer, timeout: float = 120) -> ModelServer:
    """Until the server says it is ready (its ports open only after the models loaded); works
    for TLS servers too, which the plain-gRPC readiness probe cannot reach."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited {server.process.returncode}:\n{server.log()}")
        if READY_LINE in server.log():
            return server
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"server not ready after {timeout} s:\n{server.log()}")


def start_server(directory: Path, flags: list[str], grpc_port: int | None = None) -> ModelServer:
    return wait_ready(launch(directory, flags, grpc_port))


def request_counts(server: Server, model: str = MODEL) -> dict[str, float]:
    """The server's Predict count by status code, from its Prometheus endpoint."""
    status, text = server.rest("GET", "/monitoring/prometheus/metrics")
    assert status == 200, text
    return {
        code: float(value) for name, code, value in _REQUEST_COUNT.findall(text) if name == model
    }


def count_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    codes = set(before) | set(after)
    delta = {code: after.get(code, 0.0) - before.get(code, 0.0) for code in codes}
    return {code: value for code, value in delta.items() if value}


@pytest.fixture(scope="session")
def server(tmp_path_factory, exported_version) -> ModelServer:
    """Versions 1 and 2 of `tiny`, labels stable=1 and canary=2, Prometheus metrics on."""
    root = tmp_path_factory.mktemp("client-server")
    base = make_repository(root / "models", exported_version, [1, 2])
    config = root / "models.config"
    config.write_text(config_text(base, labels={"stable": 1, "canary": 2}))
    flags = [f"--model_config_file={config}", "--allow_version_labels_for_unavailable_models"]
    started = start_server(root, flags)
    started.base_path, started.config_text = base, config.read_text()
    yield started
    started.stop()


@pytest.fixture(scope="session")
def batching_server(tmp_path_factory, exported_version) -> ModelServer:
    """Batches of up to 32 rows that wait 10 s for company unless full: a lone row is held
    far longer than any deadline the tests give it."""
    root = tmp_path_factory.mktemp("batching")
    base = make_repository(root / "models", exported_version, [1])
    parameters = root / "batching.config"
    parameters.write_text(
        "max_batch_size { value: 32 }\nbatch_timeout_micros { value: 10000000 }\n"
        "num_batch_threads { value: 1 }\n"
    )
    flags = [
        f"--model_name={MODEL}",
        f"--model_base_path={base}",
        "--enable_batching",
        f"--batching_parameters_file={parameters}",
    ]
    started = start_server(root, flags)
    yield started
    started.stop()


# --- a scripted in-process server -----------------------------------------------------------


@dataclass
class ScriptedService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """PredictionService with one signature (`x`: float32 [-1, 2] echoed as `y`) that fails
    the next Predict calls with the codes in `failures`, and records each call's metadata."""

    failures: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def GetModelMetadata(self, request, context):
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        signature = signature_map.signature_def["serving_default"]
        signature.method_name = "tensorflow/serving/predict"
        for key in ("x", "y"):
            info = (signature.inputs if key == "x" else signature.outputs)[key]
            info.dtype = 1  # DT_FLOAT
            info.tensor_shape.dim.add(size=-1)
            info.tensor_shape.dim.add(size=2)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = 7
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def Predict(self, request, context):
        with self.lock:
            self.calls.append(dict(context.invocation_metadata()))
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            context.abort(failure, f"scripted {failure.name}")
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = 7
        response.model_spec.signature_name = "serving_default"
        y = to_ndarray(request.inputs["x"])
        response.outputs["y"].CopyFrom(to_tensor_proto(y, proto_type=tensor_pb2.TensorProto))
        return response


@dataclass
class Scripted:
    target: str
    service: ScriptedService


@pytest.fixture
def scripted():
    """A ScriptedService on a real gRPC server on loopback."""
    service = ScriptedService()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield Scripted(f"127.0.0.1:{port}", service)
    grpc_server.stop(None)
