"""TF Serving warmup requests: `assets.extra/tf_serving_warmup_requests`.

TF Serving replays these PredictionLog records before a version becomes AVAILABLE, so the first
real requests do not pay for graph initialisation. More than 1000 records, or a record it cannot
run, fails the load; `replay_warmup_records` runs them the same way before we publish.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from convstack.trainer import signatures
from convstack.trainer.errors import ExportError

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
# TF Serving refuses to load a version whose warmup file holds more records than this.
MAX_WARMUP_RECORDS = 1000
# Batch 1 (single requests) and a small batch: the shapes a server sees first.
IMAGES_BATCH_SIZES = (1, 8)
IMAGE_BYTES_BATCH_SIZE = 1

PredictionLog = prediction_log_pb2.PredictionLog


def _prediction_log(model_name: str, signature_name: str, inputs: dict) -> PredictionLog:
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature_name)
    )
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )


def build_warmup_records(
    model_name: str,
    images: np.ndarray,
    images_batch_sizes: Sequence[int] = IMAGES_BATCH_SIZES,
    image_bytes_batch_size: int = IMAGE_BYTES_BATCH_SIZE,
) -> list[PredictionLog]:
    """Warmup requests built from real images (float [n, H, W, C] in [0, 1]).

    One `serving_default` request per batch size (capped at n) and one `predict_image_bytes`
    request with PNG-encoded images.
    """
    images = np.asarray(images, np.float32)
    if len(images) == 0:
        raise ExportError("warmup requests need at least one image")
    records = [
        _prediction_log(
            model_name, signatures.SERVING_DEFAULT, {signatures.IMAGES: images[:batch_size]}
        )
        for batch_size in sorted({min(size, len(images)) for size in images_batch_sizes})
    ]
    encoded = signatures.encode_png(images[:image_bytes_batch_size])
    records.append(
        _prediction_log(
            model_name,
            signatures.PREDICT_IMAGE_BYTES,
            {signatures.IMAGE_BYTES: np.array(encoded, dtype=object)},
        )
    )
    return records


def write_warmup_records(path: Path, records: Sequence[PredictionLog]) -> None:
    """Write `records` as a TFRecord file at `path` (parents created)."""
    if not 0 < len(records) <= MAX_WARMUP_RECORDS:
        raise ExportError(
            f"{path}: {len(records)} warmup records; TF Serving accepts 1..{MAX_WARMUP_RECORDS}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record.SerializeToString())


def read_warmup_records(path: Path | str) -> list[PredictionLog]:
    """Parse a warmup TFRecord file into PredictionLog messages."""
    records = []
    for serialized in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        record = prediction_log_pb2.PredictionLog()
        record.ParseFromString(serialized)
        records.append(record)
    return records


def replay_warmup_records(loaded, records: Iterable[PredictionLog]) -> None:
    """Run each record's request through the reloaded SavedModel, as TF Serving will.

    ExportError names the record whose signature, inputs or execution fails.
    """
    for index, record in enumerate(records):
        request = record.predict_log.request
        function = loaded.signatures.get(request.model_spec.signature_name)
        if function is None:
            raise ExportError(
                f"warmup record {index}: unknown signature {request.model_spec.signature_name!r}"
            )
        inputs = {key: tf.constant(tf.make_ndarray(t)) for key, t in request.inputs.items()}
        try:
            function(**inputs)
        except (TypeError, ValueError, tf.errors.OpError) as exc:
            raise ExportError(f"warmup record {index} failed to run: {exc}") from exc
