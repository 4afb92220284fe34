"""Raw bytes to every unary gRPC method: random noise and near-misses of a valid message.
Bytes that do not parse answer INTERNAL (gRPC C++'s GenericDeserialize, which TF Serving runs);
bytes that happen to parse answer what that message would (oracle.py)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from hypothesis import given
from hypothesis import strategies as st
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    predict_pb2,
    regression_pb2,
)

from tests.serving.adversarial import oracle, strategies
from tests.serving.adversarial.conftest import (
    CALL_TIMEOUT,
    Budget,
    assert_bounded_growth,
    attack_settings,
    grpc_code,
)
from tests.serving.conformance.requests import metadata_request, predict_request, status_request

pytestmark = pytest.mark.slow

PREDICTION = "/tensorflow.serving.PredictionService/"
MODEL_SERVICE = "/tensorflow.serving.ModelService/"
HEALTH_CODES = frozenset({oracle.OK, oracle.NOT_FOUND})  # NOT_FOUND: an unknown service name
# method -> (request class, the codes a parsed request may answer, a valid request to mutate)
METHODS = {
    PREDICTION + "Predict": (predict_pb2.PredictRequest, oracle.predict_codes, predict_request()),
    PREDICTION + "GetModelMetadata": (
        get_model_metadata_pb2.GetModelMetadataRequest,
        oracle.metadata_codes,
        metadata_request(),
    ),
    PREDICTION + "Classify": (
        classification_pb2.ClassificationRequest,
        lambda request: oracle.TASK_CODES,
        classification_pb2.ClassificationRequest(),
    ),
    PREDICTION + "Regress": (
        regression_pb2.RegressionRequest,
        lambda request: oracle.TASK_CODES,
        regression_pb2.RegressionRequest(),
    ),
    PREDICTION + "MultiInference": (
        inference_pb2.MultiInferenceRequest,
        lambda request: oracle.TASK_CODES,
        inference_pb2.MultiInferenceRequest(),
    ),
    MODEL_SERVICE + "GetModelStatus": (
        get_model_status_pb2.GetModelStatusRequest,
        oracle.status_codes,
        status_request(),
    ),
    # Only bytes that do not parse, or parse to no config: a parsed config would replace the
    # server's models, which is the method's job, not an attack.
    MODEL_SERVICE + "HandleReloadConfigRequest": (
        model_management_pb2.ReloadConfigRequest,
        lambda request: frozenset({oracle.INVALID_ARGUMENT}),
        model_management_pb2.ReloadConfigRequest(),
    ),
    "/grpc.health.v1.Health/Check": (
        health_pb2.HealthCheckRequest,
        lambda request: HEALTH_CODES,
        health_pb2.HealthCheckRequest(service="tiny"),
    ),
}


def expected_codes(message_class, codes_of, data: bytes) -> frozenset[str] | None:
    """The codes `data` may answer, or None for bytes this test must not send."""
    try:
        parsed = message_class.FromString(data)
    except DecodeError:
        return frozenset({oracle.INTERNAL})
    if message_class is model_management_pb2.ReloadConfigRequest and parsed.HasField("config"):
        return None
    return codes_of(parsed)


@st.composite
def method_and_bytes(draw):
    method = draw(st.sampled_from(sorted(METHODS)))
    message_class, codes_of, valid = METHODS[method]
    data = draw(strategies.raw_bytes(valid.SerializeToString()))
    return method, data, expected_codes(message_class, codes_of, data)


def test_raw_bytes_to_every_method(target):
    channel = target.server.channel()
    calls = {method: channel.unary_unary(method) for method in METHODS}  # bytes in, bytes out
    budget = Budget(25)

    @attack_settings(max_examples=2000)
    @given(method_and_bytes())
    def attack(case):
        method, data, allowed = case
        if budget.spent() or allowed is None:
            return
        try:
            calls[method](data, timeout=CALL_TIMEOUT)
            code = "OK"
        except grpc.RpcError as error:
            code = grpc_code(error)
        target.record(f"{method} {data[:600]!r}", code, allowed)

    attack()
    target.check_golden()


def test_the_server_kept_its_answer_and_its_memory(target):
    assert_bounded_growth(target)
