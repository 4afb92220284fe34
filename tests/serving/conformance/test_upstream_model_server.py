"""TF Serving's tensorflow_model_server_test.py, case by case, against our server.

Each test names the upstream case it mirrors and asserts what that case asserts, on TF Serving's
own test models (a private copy of ../shared/tfserving-upstream/testdata), with the command line
that upstream's test base gives the real server (--grpc_socket_path, --grpc_channel_arguments,
--rest_api_timeout_in_ms, --monitoring_config_file). The requests are built from the raw
tensorflow_serving.apis protos, as upstream builds them; none of upstream's code is used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from tests.serving.conformance import upstream_exports
from tests.serving.conformance.conftest import Server, launch, model_config, serving

pytestmark = pytest.mark.slow

VERSION = 123  # the one version directory (00000123) of every upstream test model
RPC_TIMEOUT = 20.0
# Upstream's RunServer adds grpc.so_reuseaddr=1 to what testGoodGrpcChannelArgs passes.
CHANNEL_ARGUMENTS = "grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb,grpc.so_reuseaddr=1"
# Served by the shared server: name -> (testdata directory, extra config).
MODELS = {
    "default": ("saved_model_half_plus_two_cpu", ""),
    "tf2": ("saved_model_half_plus_two_tf2_cpu", ""),
    "half_plus_three": ("saved_model_half_plus_three", ""),
}


@pytest.fixture(scope="module")
def server(upstream_backend, upstream_models, tmp_path_factory):
    """One server with the upstream test models, started the way upstream's RunServer does."""
    root = tmp_path_factory.mktemp("upstream-server")
    models = {name: (upstream_models / d, x) for name, (d, x) in MODELS.items()}
    flags = [
        "--rest_api_timeout_in_ms=5000",
        f"--grpc_socket_path={root / 'tf-serving.sock'}",
        f"--grpc_channel_arguments={CHANNEL_ARGUMENTS}",
        f"--monitoring_config_file={upstream_models / 'monitoring_config.txt'}",
    ]
    with serving(root, upstream_backend, models, flags) as server:
        server.socket_path = root / "tf-serving.sock"
        yield server


@pytest.fixture
def start(tmp_path, upstream_backend):
    """start(flags, wait_for) -> a server of its own for the config cases; stopped after."""
    started: list[Server] = []

    def run(flags: list[str], wait_for: str | None) -> Server:
        server = launch(tmp_path, upstream_backend, flags, f"server-{len(started)}")
        started.append(server)
        if wait_for:
            server.wait_available(wait_for)
        return server

    yield run
    for server in started:
        server.stop()


def prediction(address: str):
    return prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(address))


def verify_model_spec(spec, name: str, signature_name: str, version: int) -> None:
    """Upstream's _VerifyModelSpec."""
    assert spec.name == name
    assert spec.signature_name == signature_name
    assert spec.version.value == version


def verify_predict(
    address: str,
    expected_output: float,
    *,
    model_name: str = "default",
    specify_output: bool = True,
    batch_input: bool = False,
    signature_name: str = "serving_default",
) -> None:
    """Upstream's VerifyPredictRequest: x = [2.0] as float_val, shape [1] (or [1, 1])."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    request.inputs["x"].dtype = types_pb2.DT_FLOAT
    request.inputs["x"].float_val.append(2.0)
    request.inputs["x"].tensor_shape.dim.add().size = 1
    if batch_input:
        request.inputs["x"].tensor_shape.dim.add().size = 1
    if specify_output:
        request.output_filter.append("y")
    result = prediction(address).Predict(request, RPC_TIMEOUT)
    assert "y" in result.outputs
    assert result.outputs["y"].dtype == types_pb2.DT_FLOAT
    assert len(result.outputs["y"].float_val) == 1
    assert result.outputs["y"].float_val[0] == expected_output
    verify_model_spec(result.model_spec, model_name, signature_name, VERSION)


def one_example(request) -> None:
    example = request.input.example_list.examples.add()
    example.features.feature["x"].float_list.value.extend([2.0])


def test_get_model_status(server):
    """testGetModelStatus."""
    from tensorflow_serving.apis import model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "default"
    stub = model_service_pb2_grpc.ModelServiceStub(server.channel())
    result = stub.GetModelStatus(request, RPC_TIMEOUT)
    assert len(result.model_version_status) == 1
    assert result.model_version_status[0].version == VERSION
    assert result.model_version_status[0].status.error_code == 0


def test_get_model_metadata(server):
    """testGetModelMetadata."""
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "default"
    request.metadata_field.append("signature_def")
    result = prediction(server.target).GetModelMetadata(request, RPC_TIMEOUT)
    assert result.model_spec.name == "default"
    assert result.model_spec.version.value == VERSION
    assert list(result.metadata) == ["signature_def"]


@pytest.mark.parametrize("model", ["default", "tf2"], ids=["testClassify", "testClassifyTf2"])
def test_classify(server, model):
    """testClassify (TF1 half_plus_two) and testClassifyTf2 (its TF2 export, whose classify
    signature carries method_name tensorflow/serving/predict)."""
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "classify_x_to_y"
    one_example(request)
    result = prediction(server.target).Classify(request, RPC_TIMEOUT)
    assert len(result.result.classifications) == 1
    assert len(result.result.classifications[0].classes) == 1
    assert result.result.classifications[0].classes[0].score == 3.0
    verify_model_spec(result.model_spec, model, "classify_x_to_y", VERSION)


@pytest.mark.parametrize("model", ["default", "tf2"], ids=["testRegress", "testRegressTf2"])
def test_regress(server, model):
    """testRegress and testRegressTf2."""
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "regress_x_to_y"
    one_example(request)
    result = prediction(server.target).Regress(request, RPC_TIMEOUT)
    assert len(result.result.regressions) == 1
    assert result.result.regressions[0].value == 3.0
    verify_model_spec(result.model_spec, model, "regress_x_to_y", VERSION)


@pytest.mark.parametrize(
    "model", ["default", "tf2"], ids=["testMultiInference", "testMultiInferenceTf2"]
)
def test_multi_inference(server, model):
    """testMultiInference and testMultiInferenceTf2: a regress and a classify task over one
    Example, answered in task order."""
    request = inference_pb2.MultiInferenceRequest()
    for signature, method in (
        ("regress_x_to_y", "tensorflow/serving/regress"),
        ("classify_x_to_y", "tensorflow/serving/classify"),
    ):
        task = request.tasks.add()
        task.model_spec.name = model
        task.model_spec.signature_name = signature
        task.method_name = method
    one_example(request)
    result = prediction(server.target).MultiInference(request, RPC_TIMEOUT)
    assert len(result.results) == 2
    assert result.results[0].regression_result.regressions[0].value == 3.0
    assert result.results[1].classification_result.classifications[0].classes[0].score == 3.0
    for task, answer in zip(request.tasks, result.results, strict=True):
        verify_model_spec(answer.model_spec, model, task.model_spec.signature_name, VERSION)


def test_predict_saved_model(server):
    """testPredictSavedModel."""
    verify_predict(server.target, 3.0)


def test_good_grpc_channel_args(server):
    """testGoodGrpcChannelArgs: the server runs with upstream's channel arguments."""
    verify_predict(server.target, 3.0, specify_output=False)


def test_predict_uds(server):
    """testPredictUDS: the same service on the UNIX socket of --grpc_socket_path."""
    verify_predict(f"unix:{server.socket_path}", 3.0, specify_output=False)


def test_good_model_config(start, upstream_models, tmp_path):
    """testGoodModelConfig: upstream's good_model_config.txt with its two paths filled in."""
    template = (upstream_models / "good_model_config.txt").read_text()
    config = tmp_path / "good_model_config.txt"
    config.write_text(
        template.replace(
            "${TEST_HALF_PLUS_TWO_DIR}", str(upstream_models / "saved_model_half_plus_two_cpu")
        ).replace(
            "${TEST_HALF_PLUS_THREE_DIR}", str(upstream_models / "saved_model_half_plus_three")
        )
    )
    server = start([f"--model_config_file={config}"], wait_for="half_plus_two")
    server.wait_available("half_plus_three")
    for specify_output in (True, False):
        verify_predict(
            server.target, 3.0, model_name="half_plus_two", specify_output=specify_output
        )
        verify_predict(
            server.target, 4.0, model_name="half_plus_three", specify_output=specify_output
        )


def test_bad_model_config(start, upstream_models):
    """testBadModelConfig: the server refuses bad_model_config.txt, saying why on stderr."""
    config = upstream_models / "bad_model_config.txt"
    server = start([f"--model_config_file={config}"], wait_for=None)
    server.process.wait(timeout=120)
    assert server.process.returncode != 0
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig" in server.log()


def one_model_config(path: Path, name: str, model_path: Path) -> None:
    path.write_text(model_config({name: (model_path, "")}))


def half_plus_two_then_three(start, upstream_models, tmp_path, poll_seconds: int) -> Server:
    """Upstream's reload cases: serve half_plus_two from a config polled every `poll_seconds`,
    check it, then rewrite the config to serve half_plus_three instead."""
    config = tmp_path / "model_config.txt"
    one_model_config(config, "half_plus_two", upstream_models / "saved_model_half_plus_two_cpu")
    server = start(
        [f"--model_config_file={config}", f"--model_config_file_poll_wait_seconds={poll_seconds}"],
        wait_for="half_plus_two",
    )
    verify_predict(server.target, 3.0, model_name="half_plus_two", specify_output=False)
    one_model_config(config, "half_plus_three", upstream_models / "saved_model_half_plus_three")
    return server


def test_model_config_reload(start, upstream_models, tmp_path):
    """testModelConfigReload: with a 1 s poll, a rewritten config is served (upstream sleeps
    10 s; here the test polls for the new model for up to 60 s)."""
    server = half_plus_two_then_three(start, upstream_models, tmp_path, poll_seconds=1)
    server.wait_available("half_plus_three", timeout=60)
    verify_predict(server.target, 4.0, model_name="half_plus_three", specify_output=False)


def test_model_config_reload_with_zero_poll_period(start, upstream_models, tmp_path):
    """testModelConfigReloadWithZeroPollPeriod: poll period 0 never re-reads the config."""
    server = half_plus_two_then_three(start, upstream_models, tmp_path, poll_seconds=0)
    time.sleep(2)  # upstream's poll_period + 1: long enough for a poll that must not happen
    verify_predict(server.target, 3.0, model_name="half_plus_two", specify_output=False)


def test_classify_rest(server):
    """testClassifyREST."""
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}
    assert server.rest("POST", "/v1/models/default:classify", body) == (
        200,
        {"results": [[["", 3.0]]]},
    )


def test_regress_rest(server):
    """testRegressREST."""
    body = {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]}
    assert server.rest("POST", "/v1/models/default:regress", body) == (200, {"results": [3.0]})


def test_predict_rest(server):
    """testPredictREST."""
    body = {"instances": [2.0, 3.0, 4.0]}
    assert server.rest("POST", "/v1/models/default:predict", body) == (
        200,
        {"predictions": [3.0, 3.5, 4.0]},
    )


def test_predict_columnar_rest(server):
    """testPredictColumnarREST."""
    body = {"inputs": [2.0, 3.0, 4.0]}
    assert server.rest("POST", "/v1/models/default:predict", body) == (
        200,
        {"outputs": [3.0, 3.5, 4.0]},
    )


def test_get_status_rest(server):
    """testGetStatusREST."""
    assert server.rest("GET", "/v1/models/default") == (
        200,
        {
            "model_version_status": [
                {
                    "version": "123",
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        },
    )


def sorted_object(value):
    """Upstream's SortedObject: JSON with every list sorted, for order-free comparison."""
    if isinstance(value, dict):
        return sorted((key, sorted_object(item)) for key, item in value.items())
    if isinstance(value, list):
        return sorted(sorted_object(item) for item in value)
    return value


def test_get_model_metadata_rest(server, upstream_models):
    """testGetModelMetadataREST: exactly half_plus_two_model_metadata.json."""
    status, body = server.rest("GET", "/v1/models/default/metadata")
    expected = json.loads((upstream_models / "half_plus_two_model_metadata.json").read_text())
    assert status == 200
    assert sorted_object(body) == sorted_object(expected)


def test_prometheus_endpoint(server):
    """testPrometheusEndpoint: monitoring_config.txt turns on Prometheus text with types."""
    status, text = server.rest("GET", "/monitoring/prometheus/metrics")
    assert status == 200
    assert "# TYPE" in text


@pytest.fixture(scope="module")
def tensorflow_exports(upstream_backend, tmp_path_factory):
    """A server over the models upstream's cases build with TensorFlow itself."""
    root = tmp_path_factory.mktemp("upstream-exports")
    subprocess.run(
        [sys.executable, "-m", "tests.serving.conformance.upstream_exports", str(root)],
        check=True,
        capture_output=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    models = {name: (root / name, "") for name in upstream_exports.MODELS}
    with serving(root, upstream_backend, models, name="exports") as server:
        yield server


def test_tf_saved_model_save(tensorflow_exports):
    """test_tf_saved_model_save: a tf.saved_model.save of y = 3 * 2 * x."""
    verify_predict(
        tensorflow_exports.target, 12.0, model_name="tf_saved_model_save", specify_output=False
    )


def test_tf_saved_model_save_multiple_signatures(tensorflow_exports):
    """test_tf_saved_model_save_multiple_signatures."""
    target = tensorflow_exports.target
    verify_predict(
        target, 2.0, model_name="multiple_signatures", signature_name="custom_signature_key"
    )
    verify_predict(target, 1.0, model_name="multiple_signatures")


def keras_predict(address: str, model: str) -> predict_pb2.PredictResponse:
    """Upstream's x = 2.0 at shape [1, 1], under the names a Keras 3 export has."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["inputs"].dtype = types_pb2.DT_FLOAT
    request.inputs["inputs"].float_val.append(2.0)
    request.inputs["inputs"].tensor_shape.dim.add().size = 1
    request.inputs["inputs"].tensor_shape.dim.add().size = 1
    return prediction(address).Predict(request, RPC_TIMEOUT)


def test_sequential_keras_saved_model_save(tensorflow_exports):
    """test_sequential_keras_saved_model_save.

    Upstream's case was written for Keras 2, whose export keeps the layer names (`x` in, `y`
    out). Keras 3's tf.saved_model.save names the signature's input `inputs` and its output
    `output_0` whatever the layers are called, so the same model is asked with those names;
    the value upstream expects (2.0 for x = 2.0, batch [1, 1]) is the same."""
    result = keras_predict(tensorflow_exports.target, "keras_sequential")
    assert list(result.outputs) == ["output_0"]
    assert list(result.outputs["output_0"].float_val) == [2.0]
    verify_model_spec(result.model_spec, "keras_sequential", "serving_default", VERSION)


def test_distrat_sequential_keras_saved_model_save(tensorflow_exports):
    """test_distrat_sequential_keras_saved_model_save, where we differ from upstream's
    expectation (2.0): Keras 3 saving a MirroredStrategy model with tf.saved_model.save writes
    a SavedModel whose graph restore fills two anonymous variables, not the layer variables the
    serving signature reads. Loaded into a session over the MetaGraphDef, as TF Serving loads
    every SavedModel, the version becomes AVAILABLE and each request fails reading the kernel;
    the server says so when it loads the version. (Our trainer's export, an ExportArchive,
    serves from distributed training; tests/trainer cover it.)"""
    with pytest.raises(grpc.RpcError) as caught:
        keras_predict(tensorflow_exports.target, "keras_distributed")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details().startswith("Could not find variable sequential_1/dense/")
    if tensorflow_exports.backend == "embedded":
        assert "keras_distributed version 123: 2 variable(s) neither restored" in (
            tensorflow_exports.log()
        )


def test_mnist_client_reads(tensorflow_exports):
    """TF Serving's example/mnist_client.py, its requests and reads: a flat image through
    tf.make_tensor_proto(image, shape=[1, 784]) to `predict_images` on model `mnist`, sent with
    Predict.future, then numpy.argmax over the response's outputs['scores'].float_val."""
    import numpy as np
    import tensorflow as tf

    stub = prediction(tensorflow_exports.target)
    for label in (3, 0, 9):
        image = np.zeros(784, np.float32)
        image[label] = 1.0
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "mnist"
        request.model_spec.signature_name = "predict_images"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(image, shape=[1, image.size]))
        response = stub.Predict.future(request, 5.0).result()
        scores = np.array(response.outputs["scores"].float_val)
        assert scores.shape == (10,)
        assert int(np.argmax(scores)) == label


def test_resnet_client_grpc_reads(tensorflow_exports):
    """TF Serving's example/resnet_client_grpc.py: an image as float32 [1, h, w, 3] in [0, 1]
    through tf.make_tensor_proto(data) to `serving_default` of model `resnet`, then
    np.argmax over outputs['activation_49'].float_val."""
    import numpy as np
    import tensorflow as tf

    stub = prediction(tensorflow_exports.target)
    for channel, label in enumerate(upstream_exports.RESNET_CHANNEL_CLASSES):
        data = np.zeros((32, 32, 3), np.uint8)
        data[..., channel] = 255
        data = np.expand_dims(np.array(data) / 255.0, 0).astype(np.float32)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "resnet"
        request.model_spec.signature_name = "serving_default"
        request.inputs["input_1"].CopyFrom(tf.make_tensor_proto(data))
        result = stub.Predict(request, 10.0).outputs["activation_49"].float_val
        assert len(result) == 1000
        assert int(np.argmax(result)) == label


def test_metrics_carry_tf_serving_names_and_bounded_labels(server):
    """The request metrics as TF Serving names them (util.cc: request_count{model_name,status},
    request_latency{model_name,API,entrypoint} with API "Predict"); a request for a model the
    server does not serve adds no series of its own (hardening: names are unbounded)."""
    verify_predict(server.target, 3.0)
    made_up = predict_pb2.PredictRequest()
    made_up.model_spec.name = "made-up-model-name"
    with pytest.raises(grpc.RpcError):
        prediction(server.target).Predict(made_up, RPC_TIMEOUT)
    status, text = server.rest("GET", "/monitoring/prometheus/metrics")
    assert status == 200
    assert ':tensorflow:serving:request_count{model_name="default",status="OK"}' in text
    assert 'API="Predict",entrypoint="GRPC",model_name="default"' in text
    if server.backend == "embedded":
        assert "made-up-model-name" not in text
        assert 'model_name="<unknown>",status="NOT_FOUND"' in text


@pytest.fixture(scope="module")
def tflite_server(upstream_backend, upstream_models, tmp_path_factory):
    """upstream's RunServer(..., model_type='tflite'): --prefer_tflite_model=true."""
    models = {
        "default": (upstream_models / "saved_model_half_plus_two_tflite", ""),
        "with_sigdef": (upstream_models / "saved_model_half_plus_two_tflite_with_sigdef", ""),
    }
    root = tmp_path_factory.mktemp("upstream-tflite")
    with serving(
        root, upstream_backend, models, ["--prefer_tflite_model=true"], "tflite"
    ) as server:
        yield server


def test_predict_on_tflite(tflite_server):
    """testPredictOnTfLite: a version directory holding only model.tflite, without
    SignatureDefs: the generated serving_default takes `x` and answers `y`."""
    verify_predict(tflite_server.target, 3.0, specify_output=False)


def test_predict_with_signature_def_on_tflite(tflite_server):
    """testPredictWithSignatureDefOnTfLite: the model's stored SignatureDef maps `x` to the
    interpreter tensor tflite_input."""
    verify_predict(tflite_server.target, 3.0, model_name="with_sigdef", specify_output=False)
