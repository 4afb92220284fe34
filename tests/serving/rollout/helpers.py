"""A stand-in replica for the rollout watch tests (not a test module): a real gRPC server on
loopback that answers GetModelStatus and GetModelMetadata from a script, so what a replica
reports can be set exactly, including answers a real server gives only in a race."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

# ModelVersionStatus.State numbers, by name.
STATES = {"START": 10, "LOADING": 20, "AVAILABLE": 30, "UNLOADING": 40, "END": 50}


@dataclass
class ReplicaScript:
    """What the stand-in reports: version -> (state, error message), label -> version, and
    a gRPC code with which every GetModelMetadata call fails (None: answer normally)."""

    states: dict[int, tuple[str, str]] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    metadata_failure: grpc.StatusCode | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, script: ReplicaScript) -> None:
        self.script = script

    def GetModelStatus(self, request, context):
        response = get_model_status_pb2.GetModelStatusResponse()
        with self.script.lock:
            states = sorted(self.script.states.items(), reverse=True)
        for version, (state, error) in states:
            entry = response.model_version_status.add(version=version, state=STATES[state])
            if error:
                entry.status.error_code = grpc.StatusCode.UNKNOWN.value[0]
                entry.status.error_message = error
        return response


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, script: ReplicaScript) -> None:
        self.script = script

    def GetModelMetadata(self, request, context):
        with self.script.lock:
            failure = self.script.metadata_failure
            version = self.script.labels.get(request.model_spec.version_label)
        if failure is not None:
            context.abort(failure, f"scripted {failure.name}")
        if version is None:
            label = request.model_spec.version_label
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}"
            )
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version
        response.metadata["signature_def"].Pack(get_model_metadata_pb2.SignatureDefMap())
        return response


@contextlib.contextmanager
def stand_in_replica(script: ReplicaScript) -> Iterator[str]:
    """Serve `script` on a free loopback port; yields the HOST:PORT target."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(script), server)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _PredictionService(script), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)
