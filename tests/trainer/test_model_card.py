"""The model card schema: trainer/model_card.py (pure, no TensorFlow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from convstack.trainer import model_card
from convstack.trainer.errors import ExportError


def _fields(**overrides) -> dict:
    fields = {
        "dataset": {"uri": "digits", "fingerprint": "abc", "image_shape": (28, 28, 1)},
        "test_metrics": {"accuracy": np.float64(0.97), "loss": np.float32(0.1)},
        "training": {
            "config": {"epochs": 12, "run_dir": Path("runs/digits")},
            "strategy": "MirroredStrategy",
            "replicas": 2,
            "epochs": np.int64(12),
        },
        "notes": ("extra", "fields", "are", "kept"),
    }
    fields.update(overrides)
    return fields


def _card(**overrides) -> dict:
    return model_card.build_model_card(
        _fields(**overrides),
        model_name="digits",
        version=3,
        parent_version=2,
        signatures={"serving_default": {"inputs": {}, "outputs": {}}},
        image_shape=(28, 28, 1),
        tensorflow_version="2.21.0",
        keras_version="3.15.1",
        created="2025-01-01T00:00:00+00:00",
    )


def test_card_merges_caller_fields_with_export_fields_as_plain_json():
    card = _card()

    assert json.loads(json.dumps(card)) == card
    assert card["version"] == 3 and card["parent_version"] == 2
    assert card["dataset"]["image_shape"] == [28, 28, 1]
    assert card["training"]["config"]["run_dir"] == "runs/digits"
    assert card["training"]["epochs"] == 12 and isinstance(card["training"]["epochs"], int)
    assert card["notes"] == ["extra", "fields", "are", "kept"]
    assert "28x28" in card["preprocessing"]["image_bytes"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dataset": None}, "'dataset'"),
        ({"dataset": {"uri": "digits"}}, "fingerprint"),
        ({"test_metrics": {"loss": 1.0}}, "accuracy"),
        ({"training": {"config": {}, "strategy": "Mirrored"}}, "replicas"),
        ({"training": "MirroredStrategy"}, "'training'"),
        ({"version": 9}, r"\['version'\] are set by export"),
        ({"tflite": {}}, "set by export"),
        ({"test_metrics": {"accuracy": object()}}, "not JSON"),
    ],
)
def test_invalid_caller_fields_are_named(fields, message):
    with pytest.raises(ExportError, match=message):
        model_card.validate_card_fields(_fields(**fields))


def test_missing_caller_fields_are_listed():
    fields = _fields()
    del fields["dataset"], fields["training"]

    with pytest.raises(ExportError, match=r"missing: \['dataset', 'training'\]"):
        model_card.validate_card_fields(fields)


def test_non_finite_metrics_become_null():
    card = _card(test_metrics={"accuracy": 0.1, "loss": math.nan})

    assert card["test_metrics"]["loss"] is None


def test_tflite_section_must_be_complete():
    with pytest.raises(ExportError, match="tflite section lacks"):
        model_card.with_tflite(_card(), {"path": "assets.extra/model.tflite"})


def test_write_and_read_round_trip(tmp_path):
    card = _card()

    path = model_card.write_model_card(tmp_path, card)

    assert path == tmp_path / "assets.extra" / "model_card.json"
    assert model_card.read_model_card(tmp_path) == card


def test_module_does_not_import_tensorflow():
    source = Path(model_card.__file__).read_text()

    assert "import tensorflow" not in source and "import keras" not in source
