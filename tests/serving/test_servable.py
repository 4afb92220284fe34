"""One loaded version of a real exported SavedModel: metadata, validation, inference, warmup."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    model_pb2,
    predict_pb2,
    prediction_log_pb2,
)

from convstack.serving.errors import FailedPrecondition, InvalidArgument
from convstack.serving.servable import WARMUP_FILE, LoadError, load_version
from convstack.trainer.warmup import read_warmup_records
from tests.serving import helpers


@pytest.fixture(scope="module")
def tiny():
    return load_version(helpers.MODEL_NAME, 1, helpers.exported_version())


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    """A SavedModel whose signature takes a float [batch, 2] `a` and an int64 [batch] `b`."""

    class TwoInputs(tf.Module):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 2], tf.float32, name="a"),
                tf.TensorSpec([None], tf.int64, name="b"),
            ]
        )
        def serve(self, a, b):
            return {"total": tf.reduce_sum(a, axis=1) + tf.cast(b, tf.float32)}

    path = tmp_path_factory.mktemp("two_inputs") / "1"
    module = TwoInputs()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return load_version("two", 1, path)


def _images(batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, size=(batch, *helpers.IMAGE_SHAPE)).astype(np.float32)


def _png_bytes(batch: int) -> np.ndarray:
    pixels = (_images(batch) * 255).astype(np.uint8)
    return np.array([tf.io.encode_png(image).numpy() for image in pixels], dtype=object)


def _shape(info) -> list[int]:
    return [dim.size for dim in info.tensor_shape.dim]


def test_signature_def_map_is_the_saved_models(tiny):
    signature_defs = tiny.signature_def_map().signature_def

    assert {"serving_default", "predict_image_bytes"} <= set(signature_defs)
    default, image_bytes = signature_defs["serving_default"], signature_defs["predict_image_bytes"]
    assert default.method_name == "tensorflow/serving/predict"
    assert default.inputs["images"].dtype == types_pb2.DT_FLOAT
    assert _shape(default.inputs["images"]) == [-1, 28, 28, 1]
    assert image_bytes.inputs["image_bytes"].dtype == types_pb2.DT_STRING
    assert _shape(image_bytes.inputs["image_bytes"]) == [-1]
    for signature in (default, image_bytes):
        assert signature.outputs["probabilities"].dtype == types_pb2.DT_FLOAT
        assert _shape(signature.outputs["probabilities"]) == [-1, helpers.NUM_CLASSES]
        assert signature.outputs["classes"].dtype == types_pb2.DT_INT64
        assert _shape(signature.outputs["classes"]) == [-1]


def test_signatures_describe_inputs_and_outputs(tiny):
    assert set(tiny.signatures) == {"serving_default", "predict_image_bytes"}
    images = tiny.signatures["serving_default"].inputs["images"]
    assert (images.dtype, images.dtype_enum, images.shape) == (
        np.dtype(np.float32),
        types_pb2.DT_FLOAT,
        (None, 28, 28, 1),
    )
    image_bytes = tiny.signatures["predict_image_bytes"].inputs["image_bytes"]
    assert (image_bytes.dtype, image_bytes.shape) == (np.dtype(object), (None,))
    classes = tiny.signatures["predict_image_bytes"].outputs["classes"]
    assert (classes.dtype, classes.shape) == (np.dtype(np.int64), (None,))


def test_signature_lookup(tiny):
    assert tiny.signature("").key == "serving_default"
    assert tiny.signature("predict_image_bytes").key == "predict_image_bytes"
    with pytest.raises(FailedPrecondition) as caught:
        tiny.signature("nope")
    assert caught.value.message == 'Serving signature key "nope" not found.'
    assert caught.value.code == "FAILED_PRECONDITION"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"images": _images(1), "extra": np.zeros(1, np.float32)},
            "input size does not match signature: 2!=1 len({extra,images}) != len({images}). "
            "Sent extra: {extra}. Missing but required: {}.",
        ),
        (
            {},
            "input size does not match signature: 0!=1 len({}) != len({images}). "
            "Sent extra: {}. Missing but required: {images}.",
        ),
        (
            {"imgs": _images(1)},
            "input tensor alias not found in signature: imgs. "
            "Inputs expected to be in the set {images}.",
        ),
        (
            {"images": _images(1).astype(np.float64)},
            'Expects input "images" to be float but double is provided',
        ),
        (
            {"images": np.array([[b"x"]], dtype=object)},
            'Expects input "images" to be float but string is provided',
        ),
        (
            {"images": np.zeros((2, 28, 28), np.float32)},
            "convolution input must be 4-dimensional: [2,28,28] "
            "[[{{node functional_1/conv2d_1/Relu}}]]",
        ),
        (
            {"images": np.zeros((2, 28, 28, 1, 1), np.float32)},
            "convolution input must be 4-dimensional: [2,28,28,1,1] "
            "[[{{node functional_1/conv2d_1/Relu}}]]",
        ),
    ],
)
def test_invalid_requests_are_invalid_argument(tiny, inputs, message):
    with pytest.raises(InvalidArgument) as caught:
        tiny.run("serving_default", inputs)

    assert caught.value.message == message
    assert (caught.value.code, caught.value.http_status) == ("INVALID_ARGUMENT", 400)


def test_missing_and_extra_inputs_are_named_together(two_inputs):
    with pytest.raises(InvalidArgument) as caught:
        two_inputs.validate("", {"a": np.zeros((1, 2), np.float32), "c": 1, "d": 2})

    assert caught.value.message == (
        "input size does not match signature: 3!=2 len({a,c,d}) != len({a,b}). "
        "Sent extra: {c,d}. Missing but required: {b}."
    )


def test_shapes_are_left_to_the_graph(two_inputs):
    """TF Serving does not compare request shapes with the signature (predict_util.cc feeds the
    session as given): a shape the graph can take runs, one it cannot fails in its kernel."""
    a = np.ones((2, 2), np.float32)

    broadcast = two_inputs.run("", {"a": a, "b": np.array([1])})
    with pytest.raises(InvalidArgument) as caught:
        two_inputs.run("", {"a": a, "b": np.array([1, 2, 3])})

    np.testing.assert_allclose(broadcast["total"], [3.0, 3.0])
    assert caught.value.message == "Incompatible shapes: [3] vs. [2] [[{{node add}}]]"


def test_requests_to_be_batched_must_share_dimension_0(two_inputs):
    a, b = np.ones((2, 2), np.float32), np.array([1, 2, 3])

    with pytest.raises(InvalidArgument) as caught:
        two_inputs.validate("", {"a": a, "b": b}, batched=True)

    assert caught.value.message == (
        "Batching session Run() input tensors must have equal 0th-dimension size: "
        '"a" has shape [2,2], "b" has shape [3]'
    )
    assert two_inputs.validate("", {"a": a, "b": b[:2]}, batched=True).key == "serving_default"


def test_output_filter_errors(tiny):
    images = {"images": _images(1)}

    with pytest.raises(InvalidArgument) as unknown:
        tiny.run("serving_default", images, output_filter=["classes", "nope"])
    with pytest.raises(InvalidArgument) as duplicate:
        tiny.run("serving_default", images, output_filter=["classes", "classes"])

    assert unknown.value.message == (
        "output tensor alias not found in signature: nope Outputs expected to be in the set "
        "{classes,probabilities}."
    )
    assert duplicate.value.message == "duplicate output tensor alias: classes"


def test_unknown_signature_fails_before_input_checks(tiny):
    with pytest.raises(FailedPrecondition):
        tiny.run("classify", {"wrong": np.zeros(1)})


def test_run_matches_the_saved_model_called_directly(tiny):
    direct = tf.saved_model.load(str(helpers.exported_version()))
    images, encoded = _images(5, seed=3), _png_bytes(3)

    outputs = tiny.run("", {"images": images})
    bytes_outputs = tiny.run("predict_image_bytes", {"image_bytes": encoded})

    expected = direct.signatures["serving_default"](images=tf.constant(images))
    expected_bytes = direct.signatures["predict_image_bytes"](image_bytes=tf.constant(encoded))
    assert set(outputs) == {"probabilities", "classes"}
    np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"].numpy())
    np.testing.assert_array_equal(outputs["classes"], expected["classes"].numpy())
    assert outputs["classes"].dtype == np.int64 and outputs["probabilities"].shape == (5, 10)
    np.testing.assert_allclose(
        bytes_outputs["probabilities"], expected_bytes["probabilities"].numpy()
    )


def test_output_filter_returns_only_those_outputs(tiny):
    outputs = tiny.run("serving_default", {"images": _images(2)}, output_filter=["classes"])

    assert list(outputs) == ["classes"]
    assert outputs["classes"].shape == (2,)


def test_run_is_thread_safe(tiny):
    """Concurrent runs each get their own batch's answer, as the SavedModel called directly
    (eagerly, a path that shares no code with the session) computes it."""
    direct = tf.saved_model.load(str(helpers.exported_version())).signatures["serving_default"]
    batches = [_images(4, seed=seed) for seed in range(6)]
    expected = [direct(images=tf.constant(batch))["probabilities"].numpy() for batch in batches]
    results, errors = {}, []

    def worker(index: int) -> None:
        try:
            for _ in range(5):
                results[index] = tiny.run("", {"images": batches[index]})["probabilities"]
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sorted(results) == list(range(len(batches)))
    for index, probabilities in enumerate(expected):
        np.testing.assert_allclose(results[index], probabilities, rtol=1e-5, atol=1e-7)


def test_warmup_replays_every_exported_record(tiny):
    count = tiny.warmup()

    records = read_warmup_records(helpers.exported_version() / WARMUP_FILE)
    assert count == len(records) == 3


def test_warmup_replays_each_record_as_many_times_as_asked(tiny, monkeypatch):
    replayed = []
    run = tiny.run
    monkeypatch.setattr(tiny, "run", lambda *args: replayed.append(args[0]) or run(*args))

    assert tiny.warmup(iterations=4) == 3
    assert len(replayed) == 12


def _version_with_warmup(tmp_path, records=None, raw: bytes | None = None):
    path = helpers.add_version(tmp_path, 1)
    warmup_path = path / WARMUP_FILE
    if raw is not None:
        warmup_path.write_bytes(raw)
    elif records is None:
        warmup_path.unlink()
    else:
        with tf.io.TFRecordWriter(str(warmup_path)) as writer:
            for record in records:
                writer.write(record.SerializeToString())
    return load_version(helpers.MODEL_NAME, 1, path)


def _predict_log(signature: str, **inputs) -> prediction_log_pb2.PredictionLog:
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name="tiny", signature_name=signature)
    )
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )


def test_no_warmup_file_replays_nothing(tmp_path):
    assert _version_with_warmup(tmp_path).warmup() == 0


def test_corrupt_warmup_file_fails(tmp_path):
    version = _version_with_warmup(tmp_path, raw=b"definitely not a TFRecord file")

    with pytest.raises(LoadError) as caught:
        version.warmup()

    assert caught.value.code == "DATA_LOSS"
    assert "Please verify your warmup data is in TFRecord format." in caught.value.message
    assert "{{function_node" not in caught.value.message


def test_at_most_1000_warmup_records(tmp_path):
    empty = prediction_log_pb2.PredictionLog()  # no log type: counted, nothing to run
    accepted = _version_with_warmup(tmp_path / "ok", [empty] * 1000)
    refused = _version_with_warmup(tmp_path / "too_many", [empty] * 1001)

    assert accepted.warmup() == 1000
    with pytest.raises(LoadError) as caught:
        refused.warmup()
    assert caught.value.code == "INVALID_ARGUMENT"
    assert caught.value.message.startswith("Number of warmup records exceeds the maximum (1000)")


def test_failing_warmup_request_fails_with_its_status(tmp_path):
    good = _predict_log("serving_default", images=_images(2))
    bad = _predict_log("missing_signature", images=_images(1))
    version = _version_with_warmup(tmp_path, [good, bad])

    with pytest.raises(LoadError) as caught:
        version.warmup()

    assert caught.value.code == "FAILED_PRECONDITION"
    assert "record 1" in caught.value.message
    assert 'Serving signature key "missing_signature" not found.' in caught.value.message


def test_classify_warmup_records_are_unimplemented(tmp_path):
    record = prediction_log_pb2.PredictionLog(
        classify_log=prediction_log_pb2.ClassifyLog(
            request=classification_pb2.ClassificationRequest()
        )
    )
    version = _version_with_warmup(tmp_path, [record])

    with pytest.raises(LoadError) as caught:
        version.warmup()

    assert caught.value.code == "UNIMPLEMENTED"
    assert "Unsupported log_type for warmup: classify_log" in caught.value.message


def test_missing_saved_model_is_not_found(tmp_path):
    path = helpers.add_version(tmp_path, 1)
    (path / "saved_model.pb").unlink()

    with pytest.raises(LoadError) as caught:
        load_version("tiny", 1, path)

    assert caught.value.code == "NOT_FOUND"
    assert caught.value.message.startswith(
        f"Could not find SavedModel .pb or .pbtxt at supplied export directory path: {path}"
    )


def test_garbage_saved_model_is_data_loss(tmp_path):
    path = helpers.add_corrupt_version(tmp_path, 1)

    with pytest.raises(LoadError) as caught:
        load_version("tiny", 1, path)

    assert caught.value.code == "DATA_LOSS"
    assert caught.value.message == f"Can't parse {path / 'saved_model.pb'} as binary proto"


def test_missing_variables_fail_the_load(tmp_path):
    path = helpers.add_version(tmp_path, 1)
    for file in (path / "variables").iterdir():
        file.unlink()

    with pytest.raises(LoadError) as caught:
        load_version("tiny", 1, path)

    assert caught.value.code == "NOT_FOUND"  # TensorFlow's code for the missing checkpoint
    assert str(path / "variables") in caught.value.message


_MIRRORED_EXPORT = """
import sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras

from convstack.trainer import signatures

with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    images = keras.Input(shape=(8, 8, 1))
    x = keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(images))
    model = keras.Model(images, keras.layers.Dense(3)(keras.layers.Dropout(0.1)(x)))
signatures.write_saved_model(model, sys.argv[1])
batch = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)
np.save(sys.argv[2], batch)
np.save(sys.argv[3], tf.nn.softmax(model(batch, training=False)).numpy())
"""


@pytest.mark.slow
def test_a_mirrored_strategy_export_loads_without_a_variable_warning(tmp_path, caplog):
    """A Keras 3 ExportArchive written under MirroredStrategy keeps a never-restored handle
    for each layer variable that no signature reads; loading it warned of "5 variable(s)
    neither restored nor initialised" though every request was answered correctly."""
    path, batch_file, expected_file = tmp_path / "1", tmp_path / "x.npy", tmp_path / "y.npy"
    subprocess.run(
        [sys.executable, "-c", _MIRRORED_EXPORT, str(path), str(batch_file), str(expected_file)],
        check=True,
        capture_output=True,
        timeout=180,
    )

    with caplog.at_level("WARNING", logger="convstack.serving.servable"):
        version = load_version("mirrored", 1, path)
    outputs = version.run("", {"images": np.load(batch_file)})

    assert [r.getMessage() for r in caplog.records if "neither restored" in r.getMessage()] == []
    np.testing.assert_allclose(outputs["probabilities"], np.load(expected_file), atol=1e-6)
