"""The model card, `assets.extra/model_card.json`: what produced a version and how good it is.

Pure functions; no TensorFlow here. The schema lives in this module only: the trainer supplies
CALLER_FIELDS (plus any extra keys it likes), export fills in EXPORT_FIELDS.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

from convstack.trainer.errors import ExportError

CARD_FILE = Path("assets.extra") / "model_card.json"
SCHEMA_VERSION = 1

# What the trainer passes as `card_fields`: key -> (type, required sub-keys, meaning).
# Extra keys, top-level or nested, are kept as they are.
CALLER_FIELDS: dict[str, tuple[type, tuple[str, ...], str]] = {
    "dataset": (
        Mapping,
        ("fingerprint",),
        "uri, fingerprint, split sizes, class names, image shape",
    ),
    "test_metrics": (Mapping, ("accuracy",), "accuracy and loss on the test split"),
    "training": (
        Mapping,
        ("config", "strategy", "replicas"),
        "config (dict), strategy name, replicas, epochs/steps, seconds",
    ),
}

# What export knows; reserved, a caller may not set them.
EXPORT_FIELDS = (
    "schema_version",
    "model_name",
    "version",
    "created",
    "tensorflow_version",
    "keras_version",
    "parent_version",
    "signatures",
    "preprocessing",
)
TFLITE_FIELDS = (
    "path",
    "quantization",
    "test_accuracy",
    "saved_model_test_accuracy",
    "class_agreement",
    "size_bytes",
)


def _jsonable(value: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, tuples and paths (trainer values are mixed)."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(item) for item in items]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf; a diverged metric reads as null
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays, without importing numpy
        return _jsonable(value.tolist())
    raise ExportError(f"model card value {value!r} of type {type(value).__name__} is not JSON")


def _check_field(key: str, value: Any) -> None:
    expected_type, sub_keys, meaning = CALLER_FIELDS[key]
    if not isinstance(value, expected_type):
        raise ExportError(f"card field {key!r} ({meaning}) must be {expected_type}, got {value!r}")
    missing = [sub for sub in sub_keys if sub not in value]
    if missing:
        raise ExportError(f"card field {key!r} lacks {missing} ({meaning})")


def validate_card_fields(card_fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check the trainer's fields against the schema; return them as plain JSON values.

    Called before anything is written, so a bad card fails fast.
    """
    reserved = sorted(set(card_fields) & {*EXPORT_FIELDS, "tflite"})
    if reserved:
        raise ExportError(f"card fields {reserved} are set by export, not by the caller")
    missing = sorted(set(CALLER_FIELDS) - set(card_fields))
    if missing:
        raise ExportError(f"card fields missing: {missing} (required: {sorted(CALLER_FIELDS)})")
    for key in CALLER_FIELDS:
        _check_field(key, card_fields[key])
    return _jsonable(card_fields)


def preprocessing_note(image_shape: tuple[int, int, int]) -> dict[str, str]:
    """How each signature's input must be (or is) preprocessed."""
    height, width, channels = image_shape
    return {
        "images": f"float32 [batch, {height}, {width}, {channels}] (HxWxC), values in [0, 1]",
        "image_bytes": (
            f"PNG or JPEG strings [batch], decoded in-graph to {channels} channel(s), "
            f"converted to float32 in [0, 1] and resized to {height}x{width} (bilinear)"
        ),
    }


def utc_now() -> str:
    """The current UTC time, ISO-8601 with offset, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_model_card(
    card_fields: Mapping[str, Any],
    *,
    model_name: str,
    version: int,
    parent_version: int | None,
    signatures: Mapping[str, Any],
    image_shape: tuple[int, int, int],
    tensorflow_version: str,
    keras_version: str,
    created: str | None = None,
) -> dict[str, Any]:
    """Merge the trainer's fields with what export knows into a validated card."""
    card = validate_card_fields(card_fields)
    card.update(
        schema_version=SCHEMA_VERSION,
        model_name=model_name,
        version=version,
        created=created or utc_now(),
        tensorflow_version=tensorflow_version,
        keras_version=keras_version,
        parent_version=parent_version,
        signatures=_jsonable(signatures),
        preprocessing=preprocessing_note(image_shape),
    )
    validate_model_card(card)
    return card


def with_tflite(card: Mapping[str, Any], tflite: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `card` with its `tflite` section."""
    updated = dict(card, tflite=_jsonable(tflite))
    validate_model_card(updated)
    return updated


def validate_model_card(card: Mapping[str, Any]) -> None:
    """ExportError unless every schema field is present (and `tflite` complete, if there)."""
    missing = [key for key in (*CALLER_FIELDS, *EXPORT_FIELDS) if key not in card]
    if missing:
        raise ExportError(f"model card lacks {missing}")
    if not isinstance(card["version"], int) or card["version"] < 1:
        raise ExportError(f"model card version must be a positive integer: {card['version']!r}")
    if "tflite" in card:
        missing = [key for key in TFLITE_FIELDS if key not in card["tflite"]]
        if missing:
            raise ExportError(f"model card tflite section lacks {missing}")


def write_model_card(version_dir: Path, card: Mapping[str, Any]) -> Path:
    """Write `card` to `<version_dir>/assets.extra/model_card.json`; return that path."""
    validate_model_card(card)
    path = Path(version_dir) / CARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def read_model_card(version_dir: Path | str) -> dict[str, Any]:
    """The model card of a version directory."""
    return json.loads((Path(version_dir) / CARD_FILE).read_text())
