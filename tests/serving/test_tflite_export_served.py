"""End to end: `export --tflite KIND` -> the embedded server with --prefer_tflite_model -> Predict.

A version exported with TFLite is served from its model.tflite (the server reports only the
TFLite model's serving_default, no predict_image_bytes) under the SavedModel's input and output
keys, and answers the test split with the classes the model card measured: the same accuracy
as the card's TFLite figure, and a difference to the served SavedModel no larger than the card
reports. A copy of the version without model.tflite is served from its SavedModel (TF Serving's
fallback), as the reference.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from convstack.client import PredictionClient
from convstack.serving import model_config
from tests.trainer import export_helpers

pytestmark = pytest.mark.slow

KINDS = ("float32", "int8")
SAVED = "tiny_saved_model"
CHUNK = 32


def _export(base, kind):
    from convstack.trainer.export import export_version

    return export_version(
        export_helpers.trained_model(),
        **export_helpers.export_kwargs(base, model_name=f"tiny_{kind}", version=1),
        tflite=kind,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from convstack.serving.process import ServerProcess

    root = tmp_path_factory.mktemp("tflite-served")
    base = root / "models"
    cards = {kind: _export(base, kind).model_card for kind in KINDS}
    # The same version without its model.tflite: served from the SavedModel.
    shutil.copytree(base / "tiny_float32", base / SAVED)
    (base / SAVED / "1" / "model.tflite").unlink()
    config = model_config.ModelServerConfig()
    for name in (*(f"tiny_{kind}" for kind in KINDS), SAVED):
        config = model_config.add_model(config, name, base / name)
    config_path = root / "models.config"
    model_config.write_model_config(config_path, config)
    flags = ["--prefer_tflite_model=true", "--num_tflite_interpreters_per_pool=2"]
    server = ServerProcess.start_with_config(config_path, root / "serve.log", flags)
    try:
        for name in (*(f"tiny_{kind}" for kind in KINDS), SAVED):
            server.wait_available(name)
        yield server, cards
    finally:
        assert server.stop() == 0, server.log_tail()


def _predict(target: str, model: str, images: np.ndarray) -> dict[str, np.ndarray]:
    with PredictionClient(target, model) as client:
        chunks = [images[start : start + CHUNK] for start in range(0, len(images), CHUNK)]
        pieces = [client.predict({"images": chunk}) for chunk in chunks]
        signatures = client.metadata()
    keys = ("classes", "probabilities")
    outputs = {key: np.concatenate([piece[key] for piece in pieces]) for key in keys}
    outputs["signatures"] = sorted(signatures)
    return outputs


@pytest.mark.parametrize("kind", KINDS)
def test_served_tflite_answers_with_the_classes_the_card_reports(served, kind):
    server, cards = served
    images, labels = export_helpers.held_out_data()
    card = cards[kind]["tflite"]

    tflite = _predict(server.grpc_target, f"tiny_{kind}", images)
    saved = _predict(server.grpc_target, SAVED, images)

    # Served from model.tflite (one signature) and from the SavedModel (both) respectively.
    assert tflite["signatures"] == ["serving_default"]
    assert saved["signatures"] == ["predict_image_bytes", "serving_default"]
    tflite_accuracy = float(np.mean(tflite["classes"] == labels))
    saved_accuracy = float(np.mean(saved["classes"] == labels))
    assert tflite_accuracy == card["test_accuracy"]
    assert saved_accuracy == card["saved_model_test_accuracy"]
    assert abs(tflite_accuracy - saved_accuracy) <= abs(
        card["test_accuracy"] - card["saved_model_test_accuracy"]
    )
    assert float(np.mean(tflite["classes"] == saved["classes"])) == card["class_agreement"]
    atol = 1e-5 if kind == "float32" else 0.1  # int8 probabilities are quantised
    np.testing.assert_allclose(tflite["probabilities"], saved["probabilities"], atol=atol)
