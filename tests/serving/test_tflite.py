"""TFLite versions (--prefer_tflite_model) on TF Serving's own half_plus_two .tflite models."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
from tensorflow.core.framework import types_pb2

from convstack.serving.errors import InvalidArgument
from convstack.serving.servable import LoadedVersion, LoadError
from convstack.serving.tflite import TfLiteVersion, load_tflite_version, version_loader
from tests.serving import helpers
from tests.serving.conformance.conftest import upstream_testdata

PLAIN = "saved_model_half_plus_two_tflite"
WITH_SIGDEF = "saved_model_half_plus_two_tflite_with_sigdef"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tflite")
    for name in (PLAIN, WITH_SIGDEF):
        shutil.copytree(upstream_testdata() / name, root / name)
    return root


def load(models, name: str, pool_size: int = 1) -> TfLiteVersion:
    return load_tflite_version("m", 123, models / name / "00000123", pool_size)


def test_a_model_without_signature_defs_gets_a_generated_serving_default(models):
    """tflite_session.cc: inputs and outputs are the interpreter's tensors, keyed by name."""
    version = load(models, PLAIN)
    signature = version.signature_def_map().signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    assert {k: v.name for k, v in signature.inputs.items()} == {"x": "x"}
    assert {k: v.name for k, v in signature.outputs.items()} == {"y": "y"}
    assert signature.inputs["x"].dtype == types_pb2.DT_FLOAT
    assert [d.size for d in signature.inputs["x"].tensor_shape.dim] == [1, 1]


def test_stored_signature_defs_are_served_with_their_tensor_names_fixed(models):
    """The SignatureDef in the model's metadata names `tflite_input:0`; the interpreter's
    tensor is `tflite_input` (FixTfLiteTensorName's legacy form)."""
    version = load(models, WITH_SIGDEF)
    signature = version.signature_def_map().signature_def["serving_default"]
    assert {k: v.name for k, v in signature.inputs.items()} == {"x": "tflite_input"}
    assert {k: v.name for k, v in signature.outputs.items()} == {"y": "y"}


@pytest.mark.parametrize("shape", [(1, 1), (1,), (3, 1), (2, 2)])
def test_inputs_are_resized_to_the_request(models, shape):
    version = load(models, WITH_SIGDEF)
    x = np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape)

    y = version.run("", {"x": x})["y"]

    np.testing.assert_allclose(y, x / 2 + 2)
    assert y.shape == shape


def test_a_wrong_dtype_is_invalid_argument(models):
    with pytest.raises(InvalidArgument, match='Expects input "x" to be float but double'):
        load(models, PLAIN).run("", {"x": np.ones((1, 1))})


def test_a_pool_serves_concurrent_requests_each_with_its_own_shape(models):
    version = load(models, PLAIN, pool_size=2)
    errors: list[BaseException] = []

    def call(batch: int) -> None:
        try:
            for _ in range(50):
                x = np.full((batch, 1), batch, np.float32)
                np.testing.assert_allclose(version.run("", {"x": x})["y"], x / 2 + 2)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(batch,)) for batch in (1, 2, 3, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


def test_version_loader_prefers_model_tflite_and_falls_back_to_the_saved_model(models, tmp_path):
    """TF Serving's rule: with --prefer_tflite_model a version with model.tflite serves it,
    one without serves its SavedModel; without the flag the SavedModel always."""
    both = tmp_path / "1"
    shutil.copytree(helpers.exported_version(), both)
    shutil.copy(models / PLAIN / "00000123" / "model.tflite", both / "model.tflite")

    assert isinstance(version_loader(True)("m", 1, both), TfLiteVersion)
    assert isinstance(version_loader(False)("m", 1, both), LoadedVersion)
    assert isinstance(version_loader(True)("m", 1, helpers.exported_version()), LoadedVersion)


def test_a_corrupt_tflite_file_fails_the_load(tmp_path):
    version_dir = tmp_path / "1"
    version_dir.mkdir()
    (version_dir / "model.tflite").write_bytes(b"not a flatbuffer at all, really")
    with pytest.raises(LoadError):
        load_tflite_version("m", 1, version_dir)
