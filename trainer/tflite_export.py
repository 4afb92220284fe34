"""`serving_default` converted to TFLite, at `<version>/model.tflite` where TF Serving's
`--prefer_tflite_model` looks for it (saved_model_bundle_factory.cc).

Three kinds: `float32` (plain conversion), `float16` (weights stored as float16, dequantised at
load) and `int8` (full-integer post-training quantisation: weights and activations int8, only int8
builtin kernels allowed, so the converter fails rather than silently keeping float ops). In every
kind the model's input and output stay float32 (`images` in [0, 1], `probabilities`) and
`classes` int64, so callers feed the same tensors as to the SavedModel.

The file also carries the signature as TF Serving reads it: a TensorFlow SignatureDef in the
`signature_defs_metadata` metadata (tflite_session.cc), naming the interpreter's tensors, so a
served TFLite version answers Predict with the SavedModel's input and output keys.
A mixed-precision model is converted from a float32 copy (same weights), since the converter
cannot quantise bfloat16/float16 ops.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from flatbuffers import flexbuffers
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow.lite.python import schema_py_generated as tflite_schema
from tensorflow.lite.tools import flatbuffer_utils

from convstack.common.logs import quiet_tflite_deprecation, quiet_tflite_interpreter
from convstack.trainer import signatures
from convstack.trainer.errors import ExportError

logger = logging.getLogger(__name__)

TFLITE_FILE = Path("model.tflite")
QUANTIZATIONS = ("float32", "float16", "int8")
SIGNATURE_DEFS_METADATA = "signature_defs_metadata"
PREDICT_METHOD = "tensorflow/serving/predict"
# Calibration needs enough samples to see each activation's range; a few hundred is plenty.
REPRESENTATIVE_SAMPLES = 200
EVAL_BATCH_SIZE = 64
# The tensor type each kind must contain at least one of (else the converter ignored the ask).
_MARKER_DTYPE = {"float16": np.float16, "int8": np.int8}


def _representative_dataset(images: np.ndarray, samples: int):
    # A fixed-seed random subset, so calibration covers all classes and is reproducible.
    chosen = np.random.default_rng(0).permutation(len(images))[:samples]

    def generate():
        for index in chosen:
            yield {signatures.IMAGES: images[index : index + 1]}

    return generate


def _converter(
    saved_model_dir: Path, quantization: str, representative_images: np.ndarray | None
) -> tf.lite.TFLiteConverter:
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=[signatures.SERVING_DEFAULT]
    )
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        images = np.asarray(
            representative_images if representative_images is not None else [], np.float32
        )
        if len(images) == 0:
            raise ExportError("TFLite int8 quantisation needs representative images; none given")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative_dataset(images, REPRESENTATIVE_SAMPLES)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


def convert(
    saved_model_dir: Path, quantization: str, representative_images: np.ndarray | None = None
) -> bytes:
    """The TFLite flatbuffer of the SavedModel's `serving_default`, in `quantization`."""
    if quantization not in QUANTIZATIONS:
        raise ExportError(
            f"TFLite quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}"
        )
    converter = _converter(saved_model_dir, quantization, representative_images)
    try:
        with quiet_tflite_deprecation():
            return converter.convert()
    except Exception as exc:  # the converter raises several unrelated types
        raise ExportError(
            f"TFLite {quantization} conversion of {saved_model_dir} failed: {_summary(exc)}"
        ) from exc


def convert_for_serving(
    saved_model_dir: Path, quantization: str, representative_images: np.ndarray | None = None
) -> bytes:
    """`convert`, with `serving_default`'s SignatureDef stored as TF Serving reads it."""
    buffer = convert(saved_model_dir, quantization, representative_images)
    return with_signature_defs(buffer, {signatures.SERVING_DEFAULT: serving_signature_def(buffer)})


def convert_int8(saved_model_dir: Path, representative_images: np.ndarray) -> bytes:
    """The int8 TFLite flatbuffer of the SavedModel's `serving_default` signature."""
    return convert(saved_model_dir, "int8", representative_images)


def _summary(exc: Exception) -> str:
    # Converter errors embed the whole MLIR module; its first line and the list of
    # unsupported ops say what went wrong.
    lines = str(exc).splitlines()
    kept = lines[:1] + [line for line in lines if "ops:" in line][:1]
    return " ".join(line.strip() for line in kept)[:600]


def _tensor_info(detail: dict) -> meta_graph_pb2.TensorInfo:
    info = meta_graph_pb2.TensorInfo(name=detail["name"])
    info.dtype = tf.as_dtype(detail["dtype"]).as_datatype_enum
    for size in detail.get("shape_signature", detail["shape"]):
        info.tensor_shape.dim.add().size = int(size)
    return info


def serving_signature_def(buffer: bytes) -> meta_graph_pb2.SignatureDef:
    """`serving_default` as a TensorFlow SignatureDef over the interpreter's tensors: the
    SavedModel's keys (`images` -> `probabilities`, `classes`), the converter's tensor names."""
    runner = _interpreter(buffer).get_signature_runner(signatures.SERVING_DEFAULT)
    signature = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
    for key, detail in runner.get_input_details().items():
        signature.inputs[key].CopyFrom(_tensor_info(detail))
    for key, detail in runner.get_output_details().items():
        signature.outputs[key].CopyFrom(_tensor_info(detail))
    return signature


class _ByteStringBuilder(flexbuffers.Builder):
    """A flexbuffers Builder that writes raw bytes as a flexbuffer *string*.

    TF Serving reads each SignatureDef with `.AsString()` (signature_def_util.cc), which gives
    "" for a blob, and a serialized proto is not UTF-8, which `Builder.String` requires; the
    layout is the same as String's (size, bytes, a trailing zero), so this reuses its writer.
    """

    def byte_string(self, value: bytes) -> None:
        self._WriteBlob(value, append_zero=True, type_=flexbuffers.Type.STRING)


def signature_defs_payload(signature_defs: dict[str, meta_graph_pb2.SignatureDef]) -> bytes:
    """The flexbuffer map TF Serving's `signature_defs_metadata` holds: key -> the serialized
    SignatureDef as a flexbuffer string."""
    builder = _ByteStringBuilder()
    with builder.Map():
        for key, signature in sorted(signature_defs.items()):
            builder.Key(key)
            builder.byte_string(signature.SerializeToString())
    return bytes(builder.Finish())


def with_signature_defs(buffer: bytes, signature_defs: dict[str, meta_graph_pb2.SignatureDef]):
    """`buffer` with `signature_defs` stored as TF Serving reads them: metadata
    `signature_defs_metadata`, a flexbuffer map of serialized SignatureDefs by key."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(buffer))
    payload = signature_defs_payload(signature_defs)
    entry = tflite_schema.BufferT()
    entry.data = np.frombuffer(bytes(payload), np.uint8)
    model.buffers.append(entry)
    metadata = tflite_schema.MetadataT()
    metadata.name = SIGNATURE_DEFS_METADATA
    metadata.buffer = len(model.buffers) - 1
    model.metadata = [
        item for item in (model.metadata or []) if item.name != SIGNATURE_DEFS_METADATA.encode()
    ] + [metadata]
    return flatbuffer_utils.convert_object_to_bytearray(model)


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
def conversion_source(model: keras.Model, version_dir: Path) -> Iterator[Path]:
    """The SavedModel to convert: the version itself, or a float32 copy of a mixed model."""
    if signatures.computes_in_float32(model):
        yield version_dir
        return
    with tempfile.TemporaryDirectory(prefix="convstack-tflite-") as scratch:
        signatures.write_saved_model(float32_copy(model), Path(scratch))
        yield Path(scratch)


def _interpreter(model: Path | bytes, num_threads: int | None = None) -> tf.lite.Interpreter:
    """An interpreter with its tensors allocated, built without TFLite's chatter."""
    source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
    with quiet_tflite_interpreter():
        loaded = tf.lite.Interpreter(**source, num_threads=num_threads)
        loaded.allocate_tensors()
    return loaded


def interpreter(model: Path | bytes, num_threads: int | None = None) -> tf.lite.Interpreter:
    """A tf.lite.Interpreter of a file or flatbuffer, its tensors allocated (see _interpreter)."""
    return _interpreter(model, num_threads)


def tensor_count(model_path: Path, dtype) -> int:
    """How many tensors of the TFLite model are of `dtype`."""
    details = _interpreter(model_path).get_tensor_details()
    return sum(1 for detail in details if detail["dtype"] == dtype)


def int8_tensor_count(model_path: Path) -> int:
    """How many tensors of the TFLite model are int8 (0 means it was not quantised)."""
    return tensor_count(model_path, np.int8)


def predict_classes(model: Path | bytes, images: np.ndarray) -> np.ndarray:
    """int64 [n] classes the TFLite model (file or flatbuffer) predicts for float
    [n, H, W, C] images."""
    runner = _interpreter(model).get_signature_runner(signatures.SERVING_DEFAULT)
    images = np.asarray(images, np.float32)
    batches = [
        runner(**{signatures.IMAGES: images[start : start + EVAL_BATCH_SIZE]})[signatures.CLASSES]
        for start in range(0, len(images), EVAL_BATCH_SIZE)
    ]
    return np.concatenate(batches).astype(np.int64)


def _check_kind(path: Path, quantization: str) -> None:
    marker = _MARKER_DTYPE.get(quantization)
    if marker is not None and tensor_count(path, marker) == 0:
        raise ExportError(
            f"{path}: the converter produced no {np.dtype(marker).name} tensors for {quantization}"
        )


def export_tflite(
    version_dir: Path,
    *,
    quantization: str,
    model: keras.Model,
    representative_images: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    saved_model_classes: np.ndarray,
) -> dict:
    """Write `<version_dir>/model.tflite`; return the model card's `tflite` section: its test
    accuracy beside the SavedModel's (whose classes on the test images are
    `saved_model_classes`) and the share of test images both classify alike.

    Converts the version's own SavedModel, or, for a mixed-precision `model`, a float32 copy.
    """
    path = version_dir / TFLITE_FILE
    with conversion_source(model, version_dir) as source:
        path.write_bytes(convert_for_serving(source, quantization, representative_images))
    _check_kind(path, quantization)
    labels = np.asarray(test_labels)
    classes = predict_classes(path, test_images)
    accuracy = float(np.mean(classes == labels))
    saved_accuracy = float(np.mean(np.asarray(saved_model_classes) == labels))
    logger.info(
        "TFLite %s model %s: test accuracy %.4f (SavedModel %.4f), %d bytes",
        quantization,
        path,
        accuracy,
        saved_accuracy,
        path.stat().st_size,
    )
    return {
        "path": TFLITE_FILE.as_posix(),
        "quantization": quantization,
        "io": "float32 images/probabilities, int64 classes",
        "test_accuracy": accuracy,
        "saved_model_test_accuracy": saved_accuracy,
        "class_agreement": float(np.mean(classes == np.asarray(saved_model_classes))),
        "test_examples": len(labels),
        "size_bytes": path.stat().st_size,
    }
