"""The TFRecord format of convstack datasets: the record schema, reading it, and writing it.

A converted dataset is a directory:

    train-00000-of-00004.tfrecord ... train-00003-of-00004.tfrecord
    validation-00000-of-00004.tfrecord ...
    test-00000-of-00004.tfrecord ...
    dataset.json

Each `.tfrecord` file is an uncompressed TFRecord file of serialized `tf.train.Example` protos
with exactly two features:

    image   bytes_list, one value: an encoded PNG (what the converter writes) or JPEG image,
            8-bit grayscale (C = 1) or RGB (C = 3), every image of the dataset H x W x C
    label   int64_list, one value: the class index, 0 <= label < num_classes

A file's split is the prefix of its name: `train-`, `validation-` or `test-`. Load the directory
with `--data 'tfrecord:DIR/*.tfrecord'`. Readers decode with
`tf.io.decode_image(..., expand_animations=False)` and divide by 255; the converter stores
round(x * 255) as PNG, which is lossless, so images come back within 1/255 of the source. A
split's files read in name order give its examples in the source's order.

`dataset.json` (written by the converter; optional for shards made by other tools):

    {"format": "convstack-tfrecord/1", "source": "<uri>", "source_fingerprint": "<sha256>",
     "num_classes": K, "class_names": ["...", ...], "image_shape": [H, W, C],
     "split_sizes": {"train": N, "validation": N, "test": N}}

When present, the loader takes num_classes, class_names and image_shape from it and rejects
labels outside 0..K-1; without it, num_classes is the largest label + 1.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf
from PIL import Image

from convstack.common.files import publish, temporary_path
from convstack.trainer.errors import DataError

if TYPE_CHECKING:
    from convstack.trainer.data import Dataset

log = logging.getLogger(__name__)

FORMAT = "convstack-tfrecord/1"
DATASET_JSON = "dataset.json"
SPLITS = ("train", "validation", "test")
IMAGE_KEY = "image"
LABEL_KEY = "label"
# Channel counts a PNG written here can hold without inventing a colour model.
WRITABLE_CHANNELS = (1, 3)


@dataclass(frozen=True)
class Metadata:
    """The parts of dataset.json the loader relies on."""

    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]


def parse_example(serialized: tf.Tensor, image_shape: tuple[int, int, int]):
    """One serialized Example -> (image float32 [H, W, C] in [0, 1], label int64 scalar)."""
    features = tf.io.parse_single_example(
        serialized,
        {
            IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
            LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
        },
    )
    image = tf.io.decode_image(
        features[IMAGE_KEY], channels=image_shape[2], expand_animations=False
    )
    # Divide (not convert_image_dtype, which multiplies by 1/255) to give the very float32
    # values the in-memory sources compute with numpy.
    image = tf.cast(image, tf.float32) / 255.0
    return tf.ensure_shape(image, image_shape), features[LABEL_KEY]


def read_examples(files: list[str], image_shape: tuple[int, int, int]) -> tf.data.Dataset:
    """The examples of `files`, read one file after the other (a deterministic order)."""
    records = tf.data.TFRecordDataset(files)
    return records.map(
        lambda record: parse_example(record, image_shape),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def read_metadata(path: str | Path) -> Metadata:
    """Read and check a dataset.json; every problem names the file."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read dataset metadata: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object")
    num_classes = raw.get("num_classes")
    names = raw.get("class_names")
    shape = raw.get("image_shape")
    if not _is_int(num_classes) or num_classes < 1:
        raise DataError(f"{path}: num_classes must be a positive integer, got {num_classes!r}")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise DataError(f"{path}: class_names must be a list of strings")
    if len(names) != num_classes:
        raise DataError(f"{path}: {len(names)} class_names for num_classes {num_classes}")
    if not (
        isinstance(shape, list) and len(shape) == 3 and all(_is_int(d) and d > 0 for d in shape)
    ):
        raise DataError(f"{path}: image_shape must be [H, W, C] of positive integers")
    if shape[2] not in WRITABLE_CHANNELS:
        raise DataError(f"{path}: image_shape has {shape[2]} channels; expected 1 or 3")
    return Metadata(num_classes, tuple(names), tuple(shape))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def encode_example(image: np.ndarray, label: int) -> bytes:
    """A float [H, W, C] image in [0, 1] and its label -> a serialized Example (PNG image)."""
    pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(buffer, "PNG")
    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                IMAGE_KEY: tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[buffer.getvalue()])
                ),
                LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            }
        )
    )
    return example.SerializeToString()


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def write_tfrecords(
    dataset: Dataset, out_dir: str | Path, *, shards: int = 4
) -> dict[str, list[Path]]:
    """Write every split of `dataset` as PNG TFRecord shards plus dataset.json into `out_dir`.

    Splits get `shards` files each, or one per example when a split is smaller. Files are
    written under temporary names and renamed at the end, dataset.json last, so a directory
    holding dataset.json is complete. Refuses (DataError) when `out_dir` already holds shards.
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    out = Path(out_dir)
    _check_writable(dataset, out)
    plan = {
        split: [
            out / shard_name(split, i, count)
            for count in [min(shards, dataset.info.split_sizes[split])]
            for i in range(count)
        ]
        for split in SPLITS
    }
    out.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[Path, Path]] = []  # (temporary, final)
    try:
        for split, paths in plan.items():
            _write_split(dataset, split, paths, pending)
        meta = out / DATASET_JSON
        meta_tmp = temporary_path(meta)
        pending.append((meta_tmp, meta))
        meta_tmp.write_text(json.dumps(_metadata_json(dataset), indent=2) + "\n")
        # An earlier check is not a lock: re-check right before renaming into place.
        _check_writable(dataset, out)
        for temporary, final in pending:
            publish(temporary, final)
    finally:
        for temporary, _ in pending:
            temporary.unlink(missing_ok=True)
    return plan


def _check_writable(dataset: Dataset, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if dataset.info.image_shape[2] not in WRITABLE_CHANNELS:
        raise DataError(
            f"{dataset.info.uri}: images have {dataset.info.image_shape[2]} channels; "
            "PNG records hold 1 (grayscale) or 3 (RGB)"
        )
    if not out.is_dir():
        return
    existing = sorted(
        p.name
        for p in out.iterdir()
        if p.name == DATASET_JSON or (p.suffix == ".tfrecord" and p.name.startswith(SPLITS))
    )
    if existing:
        raise DataError(
            f"{out}: already holds a dataset ({existing[0]}); refusing to overwrite it, "
            "choose an empty --out directory"
        )


def _write_split(
    dataset: Dataset, split: str, paths: list[Path], pending: list[tuple[Path, Path]]
) -> None:
    size = dataset.info.split_sizes[split]
    # Contiguous runs of examples per shard keep the split's order across the files.
    bounds = [size * i // len(paths) for i in range(len(paths) + 1)]
    examples = _examples(dataset, split)
    for index, path in enumerate(paths):
        temporary = temporary_path(path)
        pending.append((temporary, path))  # before writing, so a failure still cleans it up
        with tf.io.TFRecordWriter(str(temporary)) as writer:
            for _ in range(bounds[index + 1] - bounds[index]):
                image, label = next(examples)
                writer.write(encode_example(image, label))
    log.info("%s: wrote %d examples to %d files", split, size, len(paths))


def _examples(dataset: Dataset, split: str) -> Iterator[tuple[np.ndarray, int]]:
    for images, labels in dataset.split(split).batch(256).as_numpy_iterator():
        yield from zip(images, labels, strict=True)


def _metadata_json(dataset: Dataset) -> dict:
    info = dataset.info
    return {
        "format": FORMAT,
        "source": info.uri,
        "source_fingerprint": info.fingerprint,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "image_shape": list(info.image_shape),
        "split_sizes": {split: info.split_sizes[split] for split in SPLITS},
    }
