"""Full-integer (int8) post-training quantisation of `serving_default` to TFLite.

Weights and activations are int8 and only int8 builtin kernels are allowed (the converter fails
rather than silently keeping float ops). The model's input and output stay float32 (`images` in
[0, 1], `probabilities`) and `classes` int64, with quantize/dequantize at the edges, so callers
feed the same tensors as to the SavedModel and need no scale/zero-point handling.
A mixed-precision model is converted from a float32 copy (same weights), since the converter
cannot quantise bfloat16/float16 ops.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from convstack.trainer import signatures
from convstack.trainer.errors import ExportError

logger = logging.getLogger(__name__)

TFLITE_FILE = Path("assets.extra") / "model.tflite"
# Calibration needs enough samples to see each activation's range; a few hundred is plenty.
REPRESENTATIVE_SAMPLES = 200
EVAL_BATCH_SIZE = 64


def _representative_dataset(images: np.ndarray, samples: int):
    # A fixed-seed random subset, so calibration covers all classes and is reproducible.
    chosen = np.random.default_rng(0).permutation(len(images))[:samples]

    def generate():
        for index in chosen:
            yield {signatures.IMAGES: images[index : index + 1]}

    return generate


def convert_int8(
    saved_model_dir: Path, representative_images: np.ndarray, samples: int = REPRESENTATIVE_SAMPLES
) -> bytes:
    """The int8 TFLite flatbuffer of the SavedModel's `serving_default` signature."""
    images = np.asarray(representative_images, np.float32)
    if len(images) == 0:
        raise ExportError("TFLite int8 quantisation needs representative images; none given")
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=[signatures.SERVING_DEFAULT]
    )
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative_dataset(images, samples)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        with _quiet_interpreter_deprecation():  # calibration runs the interpreter too
            return converter.convert()
    except Exception as exc:  # the converter raises several unrelated types
        raise ExportError(
            f"TFLite int8 conversion of {saved_model_dir} failed: {_summary(exc)}"
        ) from exc


def _summary(exc: Exception) -> str:
    # Converter errors embed the whole MLIR module; its first line and the list of
    # unsupported ops say what went wrong.
    lines = str(exc).splitlines()
    kept = lines[:1] + [line for line in lines if "ops:" in line][:1]
    return " ".join(line.strip() for line in kept)[:600]


@contextlib.contextmanager
def _global_float32_policy() -> Iterator[None]:
    # Layers without an explicit dtype (InputLayer, the model itself) take the global policy,
    # which the trainer leaves at mixed_bfloat16/mixed_float16 for the whole run.
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def float32_copy(model: keras.Model) -> keras.Model:
    """The same functional/Sequential model with every layer computing in float32.

    Mixed-precision variables are float32 already, so the weights copy exactly; the int8
    converter cannot quantise bfloat16/float16 ops.
    """
    config = model.get_config()
    for layer in config.get("layers", []):
        layer["config"]["dtype"] = "float32"
    try:
        with _global_float32_policy():
            copy = model.__class__.from_config(config)
        copy.set_weights(model.get_weights())
    except Exception as exc:
        raise ExportError(f"cannot rebuild {model.name!r} in float32 for TFLite: {exc}") from exc
    if not signatures.computes_in_float32(copy):
        raise ExportError(f"cannot rebuild {model.name!r} in float32 for TFLite")
    return copy


@contextlib.contextmanager
def _conversion_source(model: keras.Model, version_dir: Path) -> Iterator[Path]:
    """The SavedModel to convert: the version itself, or a float32 copy of a mixed model."""
    if signatures.computes_in_float32(model):
        yield version_dir
        return
    with tempfile.TemporaryDirectory(prefix="convstack-tflite-") as scratch:
        signatures.write_saved_model(float32_copy(model), Path(scratch))
        yield Path(scratch)


@contextlib.contextmanager
def _quiet_interpreter_deprecation():
    # TF 2.21 warns that tf.lite.Interpreter moves to ai_edge_litert; it still works.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        yield


def _interpreter(model_path: Path) -> tf.lite.Interpreter:
    with _quiet_interpreter_deprecation():
        return tf.lite.Interpreter(model_path=str(model_path))


def int8_tensor_count(model_path: Path) -> int:
    """How many tensors of the TFLite model are int8 (0 means it was not quantised)."""
    details = _interpreter(model_path).get_tensor_details()
    return sum(1 for detail in details if detail["dtype"] == np.int8)


def predict_classes(model_path: Path, images: np.ndarray) -> np.ndarray:
    """int64 [n] classes the TFLite model predicts for float [n, H, W, C] images."""
    runner = _interpreter(model_path).get_signature_runner(signatures.SERVING_DEFAULT)
    images = np.asarray(images, np.float32)
    batches = [
        runner(**{signatures.IMAGES: images[start : start + EVAL_BATCH_SIZE]})[signatures.CLASSES]
        for start in range(0, len(images), EVAL_BATCH_SIZE)
    ]
    return np.concatenate(batches).astype(np.int64)


def export_tflite(
    version_dir: Path,
    *,
    model: keras.Model,
    representative_images: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    float_test_accuracy: float,
) -> dict:
    """Write `<version_dir>/assets.extra/model.tflite`; return the model card's `tflite` section.

    Converts the version's own SavedModel, or, for a mixed-precision `model`, a float32 copy.
    """
    path = version_dir / TFLITE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_source(model, version_dir) as source:
        path.write_bytes(convert_int8(source, representative_images))
    if int8_tensor_count(path) == 0:
        raise ExportError(f"{path}: the converter produced no int8 tensors")
    accuracy = float(np.mean(predict_classes(path, test_images) == np.asarray(test_labels)))
    logger.info(
        "TFLite int8 model %s: test accuracy %.4f (float %.4f), %d bytes",
        path,
        accuracy,
        float_test_accuracy,
        path.stat().st_size,
    )
    return {
        "path": TFLITE_FILE.as_posix(),
        "quantization": "int8",
        "io": "float32 images/probabilities, int64 classes",
        "test_accuracy": accuracy,
        "float_test_accuracy": float(float_test_accuracy),
        "size_bytes": path.stat().st_size,
    }
