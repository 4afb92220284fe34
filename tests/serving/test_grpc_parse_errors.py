"""grpc_api.ParseFailuresAsInternal on an in-process grpc.aio server: bytes that do not parse
answer INTERNAL, as gRPC C++ (grpcpp's GenericDeserialize, which TF Serving runs) does, where
grpc python answers UNKNOWN; everything that parses reaches the servicer unchanged."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from convstack.serving.grpc_api import ParseFailuresAsInternal

PREDICT = "/tensorflow.serving.PredictionService/Predict"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
JUNK = b"\x0a\x05ab"  # field 1, 5 bytes long, 2 bytes sent


class EchoNames(prediction_service_pb2_grpc.PredictionServiceServicer):
    async def Predict(self, request, context):
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        return response


async def call_all(calls: list[tuple[str, bytes]], registrar: bool):
    """Serve EchoNames and grpc's health service, make each (method, raw bytes) call, and
    return (code name, details or reply bytes) for each."""
    server = grpc.aio.server()
    target = ParseFailuresAsInternal(server) if registrar else server
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(EchoNames(), target)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), target)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method, data in calls:
                try:
                    reply = await channel.unary_unary(method)(data, timeout=10)
                    results.append(("OK", reply))
                except grpc.aio.AioRpcError as error:
                    results.append((error.code().name, error.details()))
    finally:
        await server.stop(0)
    return results


def run(calls, registrar=True):
    return asyncio.run(call_all(calls, registrar))


def test_grpc_python_alone_answers_unknown():
    """Why the registrar exists."""
    [(code, _)] = run([(PREDICT, JUNK)], registrar=False)
    assert code == "UNKNOWN"


@pytest.mark.parametrize("method", [PREDICT, HEALTH_CHECK])
def test_unparseable_bytes_answer_internal_naming_the_message(method):
    [(code, details)] = run([(method, JUNK)])
    assert code == "INTERNAL"
    assert "Error parsing message" in details


def test_parsed_requests_reach_the_servicer_unchanged():
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    check = health_pb2.HealthCheckRequest(service="").SerializeToString()
    results = run([(PREDICT, request.SerializeToString()), (PREDICT, b""), (HEALTH_CHECK, check)])
    assert [code for code, _ in results] == ["OK", "OK", "OK"]
    assert predict_pb2.PredictResponse.FromString(results[0][1]).model_spec.name == "tiny"
    assert predict_pb2.PredictResponse.FromString(results[1][1]).model_spec.name == ""


def test_methods_the_service_lacks_stay_unimplemented():
    [(code, _)] = run([("/tensorflow.serving.PredictionService/Nope", JUNK)])
    assert code == "UNIMPLEMENTED"
