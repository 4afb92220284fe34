"""TF Serving's predict_impl_test.cc and get_model_status_impl_test.cc, case by case, over gRPC
against our server, plus the shapes and TF1 models its contract names.

Upstream runs these against ServerCore in-process; here every case goes through the wire, on
TF Serving's test models (a private copy of ../shared/tfserving-upstream/testdata). Each test
names the upstream case and asserts what it asserts; exact-proto expectations are compared
as whole protos, as upstream's EqualsProto does.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.serving.conformance.conftest import serving
from tests.serving.conformance.test_upstream_model_server import RPC_TIMEOUT

pytestmark = pytest.mark.slow

TEST_MODEL = "test_model"  # saved_model_half_plus_two_2_versions: versions 123 and 124
COUNTER = "counter"
HALF_PLUS_TWO = "half_plus_two"  # TF1 saved_model_half_plus_two_cpu, x: [-1, 1]
HALF_PLUS_THREE = "half_plus_three"  # TF1, scalar signatures
TF2 = "tf2"
MODELS = {
    TEST_MODEL: ("saved_model_half_plus_two_2_versions", "model_version_policy { all {} }"),
    COUNTER: ("saved_model_counter", ""),
    HALF_PLUS_TWO: ("saved_model_half_plus_two_cpu", ""),
    HALF_PLUS_THREE: ("saved_model_half_plus_three", ""),
    TF2: ("saved_model_half_plus_two_tf2_cpu", ""),
}


@pytest.fixture(scope="module")
def server(upstream_backend, upstream_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream-impl")
    models = {name: (upstream_models / d, x) for name, (d, x) in MODELS.items()}
    with serving(root, upstream_backend, models, name="impl") as server:
        yield server


def stub(server):
    return prediction_service_pb2_grpc.PredictionServiceStub(server.channel())


def scalar(value: float) -> tensor_pb2.TensorProto:
    """A float TensorProto with one float_val and no shape, as upstream's tests build it."""
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[value])


def request(
    name: str = TEST_MODEL, version: int | None = 123, signature: str = "", **inputs
) -> predict_pb2.PredictRequest:
    built = predict_pb2.PredictRequest()
    built.model_spec.name = name
    if version is not None:
        built.model_spec.version.value = version
    built.model_spec.signature_name = signature
    for key, proto in inputs.items():
        built.inputs[key].CopyFrom(proto)
    return built


def code_of(call, message) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call(message, timeout=RPC_TIMEOUT)
    return caught.value.code()


def expected_response(spec_of, signature: str, outputs: dict[str, float]):
    """The response upstream expects: the request's ModelSpec with the resolved signature,
    each output a shapeless float with one float_val."""
    response = predict_pb2.PredictResponse()
    response.model_spec.CopyFrom(spec_of.model_spec)
    response.model_spec.signature_name = signature
    for key, value in outputs.items():
        proto = response.outputs[key]
        proto.dtype = types_pb2.DT_FLOAT
        proto.tensor_shape.SetInParent()
        proto.float_val.append(value)
    return response


def test_missing_or_empty_model_spec(server):
    """PredictImplTest.MissingOrEmptyModelSpec."""
    predict = stub(server).Predict
    assert code_of(predict, predict_pb2.PredictRequest()) == grpc.StatusCode.INVALID_ARGUMENT
    empty_name = predict_pb2.PredictRequest()
    empty_name.model_spec.SetInParent()
    assert code_of(predict, empty_name) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(predict, request("test", version=None)) == grpc.StatusCode.NOT_FOUND


def test_empty_input_list(server):
    """PredictImplTest.EmptyInputList."""
    assert code_of(stub(server).Predict, request()) == grpc.StatusCode.INVALID_ARGUMENT


def test_input_tensors_dont_match_model_spec_inputs(server):
    """PredictImplTest.InputTensorsDontMatchModelSpecInputs."""
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"any_key"])
    proto.tensor_shape.dim.add().size = 1
    message = request(key=proto)
    assert code_of(stub(server).Predict, message) == grpc.StatusCode.INVALID_ARGUMENT


def test_output_filters_dont_match_model_spec_outputs(server):
    """PredictImplTest.OutputFiltersDontMatchModelSpecOutputs."""
    predict = stub(server).Predict
    message = request(x=scalar(2.0))
    message.output_filter.append("output_filter")
    assert code_of(predict, message) == grpc.StatusCode.INVALID_ARGUMENT
    del message.output_filter[:]
    message.output_filter.append("y")
    assert predict(message, timeout=RPC_TIMEOUT).outputs["y"].float_val == [3.0]
    message.output_filter.append("y")
    assert code_of(predict, message) == grpc.StatusCode.INVALID_ARGUMENT


def test_input_tensors_have_wrong_type(server):
    """PredictImplTest.InputTensorsHaveWrongType."""
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"any_key"])
    proto.tensor_shape.dim.add().size = 1
    message = request(x=proto)
    message.output_filter.append("y")
    assert code_of(stub(server).Predict, message) == grpc.StatusCode.INVALID_ARGUMENT


def test_prediction_success(server):
    """PredictImplTest.PredictionSuccess: a shapeless 2.0 answers a shapeless 3.0, in
    float_val, with the ModelSpec of the request and the resolved signature."""
    message = request(x=scalar(2.0))
    response = stub(server).Predict(message, timeout=RPC_TIMEOUT)
    assert response == expected_response(message, "serving_default", {"y": 3.0})


@pytest.mark.parametrize(
    ("signature", "output"),
    [("regress_x2_to_y3", "outputs"), ("classify_x2_to_y3", "scores")],
    ids=["PredictionWithNamedRegressionSignature", "PredictionWithNamedClassificationSignature"],
)
def test_prediction_with_named_signature(server, signature, output):
    """PredictImplTest.PredictionWithNamed{Regression,Classification}Signature: Predict
    serves classify and regress signatures too (y3 = x2 / 2 + 3)."""
    message = request(signature=signature, inputs=scalar(2.0))
    response = stub(server).Predict(message, timeout=RPC_TIMEOUT)
    assert response == expected_response(message, signature, {output: 4.0})


def test_prediction_with_customized_signatures(server):
    """PredictImplTest.PredictionWithCustomizedSignatures on the TF1 counter model (reference
    variables): get 0, incr 1, reset 0, incr 1 (with an output filter), incr_by 3 -> 4."""
    predict = stub(server).Predict
    steps = [
        ("get_counter", {}, (), 0.0),
        ("incr_counter", {}, (), 1.0),
        ("reset_counter", {}, (), 0.0),
        ("incr_counter", {}, ("output",), 1.0),
        ("incr_counter_by", {"delta": scalar(3.0)}, (), 4.0),
    ]
    for signature, inputs, output_filter, expected in steps:
        message = request(COUNTER, signature=signature, **inputs)
        message.output_filter.extend(output_filter)
        response = predict(message, timeout=RPC_TIMEOUT)
        assert response == expected_response(message, signature, {"output": expected}), signature


@pytest.mark.parametrize(
    "shape",
    [[1], [], [3], [2, 2], [1, 1]],
    ids=["[1]", "scalar", "[3]", "[2,2]", "[1,1]"],
)
def test_shapes_are_left_to_the_graph(server, shape):
    """TF Serving does not compare request shapes with the signature's [-1, 1]: the graph
    takes [1], a scalar, [3] and [2, 2] (y = x / 2 + 2, elementwise)."""
    values = np.arange(1, int(np.prod(shape)) + 1, dtype=np.float32).reshape(shape)
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=values.ravel().tolist())
    for size in shape:
        proto.tensor_shape.dim.add().size = size
    response = stub(server).Predict(
        request(HALF_PLUS_TWO, version=None, x=proto), timeout=RPC_TIMEOUT
    )
    y = response.outputs["y"]
    assert [dim.size for dim in y.tensor_shape.dim] == shape
    assert list(y.float_val) == (values / 2 + 2).ravel().tolist()


def test_tf1_scalar_signatures_load_and_serve(server):
    """saved_model_half_plus_three (TF1, scalar signatures) serves y = x / 2 + 3."""
    response = stub(server).Predict(
        request(HALF_PLUS_THREE, version=None, x=scalar(2.0)), timeout=RPC_TIMEOUT
    )
    assert list(response.outputs["y"].float_val) == [4.0]


def test_tf2_signature_takes_any_rank_its_graph_takes(server):
    """The TF2 export's signature says [-1, 1]; its graph is elementwise, so a [3, 1, 1, 1]
    input runs, as it does in TF Serving."""
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0, 2.0, 3.0])
    for size in (3, 1, 1, 1):
        proto.tensor_shape.dim.add().size = size
    response = stub(server).Predict(request(TF2, version=None, x=proto), timeout=RPC_TIMEOUT)
    assert [dim.size for dim in response.outputs["y"].tensor_shape.dim] == [3, 1, 1, 1]
    assert list(response.outputs["y"].float_val) == [2.5, 3.0, 3.5]


def status_request(name: str, version: int | None = None):
    message = get_model_status_pb2.GetModelStatusRequest()
    if name is not None:
        message.model_spec.name = name
    if version is not None:
        message.model_spec.version.value = version
    return message


def model_service(server):
    return model_service_pb2_grpc.ModelServiceStub(server.channel())


def test_get_model_status_failures(server):
    """GetModelStatusImplTest.MissingOrEmptyModelSpecFailure, InvalidModelNameFailure and
    InvalidModelVersionFailure."""
    status = model_service(server).GetModelStatus
    empty = get_model_status_pb2.GetModelStatusRequest()
    assert code_of(status, empty) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(status, status_request("nonexistent_model")) == grpc.StatusCode.NOT_FOUND
    assert code_of(status, status_request(TEST_MODEL, 999)) == grpc.StatusCode.NOT_FOUND


def test_get_model_status_all_versions_success(server):
    """GetModelStatusImplTest.AllVersionsSuccess."""
    reply = model_service(server).GetModelStatus(status_request(TEST_MODEL), timeout=RPC_TIMEOUT)
    assert {entry.version for entry in reply.model_version_status} == {123, 124}
    for entry in reply.model_version_status:
        assert (entry.status.error_code, entry.status.error_message) == (0, "")


def test_get_model_status_single_version_success(server):
    """GetModelStatusImplTest.SingleVersionSuccess."""
    reply = model_service(server).GetModelStatus(
        status_request(TEST_MODEL, 123), timeout=RPC_TIMEOUT
    )
    assert [entry.version for entry in reply.model_version_status] == [123]
    entry = reply.model_version_status[0]
    assert (entry.status.error_code, entry.status.error_message) == (0, "")
