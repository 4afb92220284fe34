"""The gRPC rows of TFSERVING_CONTRACT.md against one running server (two versions, labels)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)

from tests.serving.conformance.conftest import MODEL, write_config
from tests.serving.conformance.requests import (
    images,
    metadata_request,
    predict_request,
    status_request,
    versions_by_state,
)
from tests.serving.helpers import make_repository
from tests.trainer import export_helpers

pytestmark = pytest.mark.slow

# TF Serving refuses labels in the initial config unless this flag is set (the versions are not
# AVAILABLE yet when the config is first applied).
LABEL_FLAG = "--allow_version_labels_for_unavailable_models"

LABELS = (
    "model_version_policy { specific { versions: 1 versions: 2 } } "
    'version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 2 }'
)


@pytest.fixture
def server(tmp_path, start_server, exported_version):
    model_dir = make_repository(tmp_path / "models", exported_version, [1, 2])
    config = write_config(tmp_path / "models.config", [(MODEL, model_dir)], LABELS)
    return start_server([f"--model_config_file={config}", LABEL_FLAG])


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    return caught.value


def test_grpc_contract(server):
    """One server, every row (a server start is the expensive part, so rows share it)."""
    predict = server.prediction().Predict
    model_service = server.models()

    # Resolution: neither version nor label -> the highest loaded version; version; labels.
    reply = predict(predict_request(), timeout=30)
    assert (reply.model_spec.name, reply.model_spec.version.value) == (MODEL, 2)
    assert reply.model_spec.signature_name == "serving_default"
    probabilities = tf.make_ndarray(reply.outputs["probabilities"])
    classes = tf.make_ndarray(reply.outputs["classes"])
    assert probabilities.shape == (4, 10) and classes.dtype == np.int64
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    expected = export_helpers.trained_model()(images(), training=False).numpy().argmax(axis=1)
    np.testing.assert_array_equal(classes, expected)
    assert predict(predict_request(version=1), timeout=30).model_spec.version.value == 1
    assert predict(predict_request(label="stable"), timeout=30).model_spec.version.value == 1
    assert predict(predict_request(label="canary"), timeout=30).model_spec.version.value == 2

    # output_filter
    filtered = predict(predict_request(output_filter=("classes",)), timeout=30)
    assert list(filtered.outputs) == ["classes"]
    error = rpc_error(predict, predict_request(output_filter=("nope",)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in error.details()

    # The image-bytes signature decodes PNGs in the graph.
    from convstack.trainer.signatures import encode_png

    png = np.array(encode_png(images(2)), dtype=object)
    reply = predict(predict_request({"image_bytes": png}, signature="predict_image_bytes"))
    assert tf.make_ndarray(reply.outputs["classes"]).tolist() == expected[:2].tolist()
    assert reply.model_spec.signature_name == "predict_image_bytes"

    # Error rows: code and message.
    cases = [
        (predict_pb2.PredictRequest(), grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"),
        (
            predict_request(name="nope"),
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Latest(nope)",
        ),
        (
            predict_request(version=99),
            grpc.StatusCode.NOT_FOUND,
            f"Servable not found for request: Specific({MODEL}, 99)",
        ),
        (
            predict_request(label="nope"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Unrecognized servable version label: nope",
        ),
        (
            predict_request(signature="nope"),
            grpc.StatusCode.FAILED_PRECONDITION,
            'Serving signature key "nope" not found.',
        ),
        (
            predict_request({"images": images(), "extra": np.zeros(4)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input size does not match signature",
        ),
        (
            predict_request({"pixels": images()}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input tensor alias not found in signature: pixels",
        ),
        (
            predict_request({"images": images().astype(np.int32)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "images",
        ),
    ]
    for request, code, message in cases:
        error = rpc_error(predict, request)
        assert (error.code(), message in error.details()) == (code, True), error.details()
    dtype_error = rpc_error(predict, predict_request({"images": images().astype(np.int32)}))
    assert "DT_FLOAT" in dtype_error.details() or "float" in dtype_error.details()

    # GetModelStatus: descending versions, states, errors.
    reply = model_service.GetModelStatus(status_request(), timeout=30)
    assert [s.version for s in reply.model_version_status] == [2, 1]
    assert versions_by_state(reply) == {2: "AVAILABLE", 1: "AVAILABLE"}
    assert all(s.status.error_code == 0 for s in reply.model_version_status)
    one = model_service.GetModelStatus(status_request(version=1), timeout=30)
    assert [s.version for s in one.model_version_status] == [1]
    error = rpc_error(model_service.GetModelStatus, status_request(name="nope"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "Could not find any versions of model nope" in error.details()
    error = rpc_error(model_service.GetModelStatus, status_request(version=7))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert f"Could not find version 7 of model {MODEL}" in error.details()

    # GetModelMetadata: the SignatureDefMap of the resolved version.
    metadata = server.prediction().GetModelMetadata(metadata_request(), timeout=30)
    assert metadata.model_spec.name == MODEL and metadata.model_spec.version.value == 2
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert metadata.metadata["signature_def"].Unpack(signature_map)
    default = signature_map.signature_def["serving_default"]
    assert default.inputs["images"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in default.inputs["images"].tensor_shape.dim] == [-1, 28, 28, 1]
    assert set(default.outputs) == {"probabilities", "classes"}
    assert "predict_image_bytes" in signature_map.signature_def
    error = rpc_error(server.prediction().GetModelMetadata, metadata_request(fields=()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GetModelMetadataRequest must specify at least one metadata_field" in error.details()

    # Classify / Regress / MultiInference on a model with only predict signatures: with the
    # method-name check off (TF Serving's default) the signature's structure is what fails.
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = MODEL
    error = rpc_error(server.prediction().Classify, classify)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("No classification inputs found in SignatureDef: ")
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = MODEL
    error = rpc_error(server.prediction().Regress, regress)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "Expected one output Tensor."
    multi = inference_pb2.MultiInferenceRequest()
    task = multi.tasks.add()
    task.model_spec.name = MODEL
    task.method_name = "tensorflow/serving/classify"
    error = rpc_error(server.prediction().MultiInference, multi)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

    # After all of that the server still serves.
    assert predict(predict_request(), timeout=30).model_spec.version.value == 2


def test_shapes_are_left_to_the_graph(server):
    """TF Serving feeds the session whatever shape a request has (predict_util.cc): a shape the
    graph cannot take fails in its kernel with INVALID_ARGUMENT, and the server keeps serving."""
    error = rpc_error(
        server.prediction().Predict,
        predict_request({"images": np.zeros((2, 14, 14), np.float32)}),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "convolution input must be 4-dimensional: [2,14,14]" in error.details()
    bad_proto = predict_request()
    bad_proto.inputs["images"].tensor_content = b"\x00" * 7  # not a whole number of floats
    error = rpc_error(server.prediction().Predict, bad_proto)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.prediction().Predict(predict_request(), timeout=30).outputs
