"""Tiny datasets in every format, generated in tmp_path.

Example `i` of the npz and TFRecord fixtures is a flat image of value `5 * i` (0..255), so a
test can tell which example it is looking at: `example_ids(images)` inverts it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

SIDE = 8


def flat_image(example_id: int, channels: int = 1) -> np.ndarray:
    """uint8 [SIDE, SIDE, channels] filled with 5 * example_id."""
    return np.full((SIDE, SIDE, channels), 5 * example_id, np.uint8)


def encode(pixels: np.ndarray, kind: str = "PNG") -> bytes:
    """uint8 [H, W, C] -> PNG or JPEG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(buffer, kind)
    return buffer.getvalue()


def example(image: bytes, label: int) -> bytes:
    """A serialized tf.train.Example in the convstack schema."""
    import tensorflow as tf

    features = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def write_records(path: Path, records: list[bytes]) -> Path:
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return path


@pytest.fixture
def helpers() -> SimpleNamespace:
    """The helpers of this module, for tests (conftest modules are not meant to be imported)."""
    functions = (flat_image, encode, example, write_records, example_ids)
    return SimpleNamespace(**{function.__name__: function for function in functions})


def example_ids(images: np.ndarray) -> list[int]:
    """Invert flat_image for float images in [0, 1]: one id per image."""
    return [int(v) for v in np.round(images.reshape(len(images), -1)[:, 0] * 255 / 5)]


@pytest.fixture
def make_npz(tmp_path) -> Callable[..., Path]:
    """Write an MNIST-format npz: 40 train (ids 0..39) and 12 test (ids 40..51) images, labels
    id % 4. Keyword arguments replace arrays; a value of None drops the key."""

    def make(name: str = "tiny.npz", **arrays) -> Path:
        ids = np.arange(52)
        images = np.stack([flat_image(i)[..., 0] for i in ids])
        contents = {
            "x_train": images[:40],
            "y_train": (ids[:40] % 4).astype(np.uint8),
            "x_test": images[40:],
            "y_test": (ids[40:] % 4).astype(np.uint8),
        }
        contents.update(arrays)
        path = tmp_path / name
        np.savez(path, **{k: v for k, v in contents.items() if v is not None})
        return path

    return make


@pytest.fixture
def npz_path(make_npz) -> Path:
    return make_npz()


def _pattern(label: int, index: int, channels: int) -> np.ndarray:
    rows = np.arange(SIDE)[:, None, None]
    return ((rows * 20 + label * 60 + index * 3) % 256 * np.ones((SIDE, SIDE, channels))).astype(
        np.uint8
    )


@pytest.fixture
def make_image_folder(tmp_path) -> Callable[..., Path]:
    """DIR/{cat,dog,emu}/NN.png|jpg: `per_class` images per class, every third one a JPEG."""

    def make(name: str = "images", per_class: int = 6, channels: int = 1) -> Path:
        root = tmp_path / name
        for label, cls in enumerate(("cat", "dog", "emu")):
            (root / cls).mkdir(parents=True)
            for index in range(per_class):
                kind, suffix = ("JPEG", "jpg") if index % 3 == 2 else ("PNG", "png")
                data = encode(_pattern(label, index, channels), kind)
                (root / cls / f"{index:02d}.{suffix}").write_bytes(data)
        return root

    return make


@pytest.fixture
def image_folder(make_image_folder) -> Path:
    return make_image_folder()


@pytest.fixture
def tfrecord_dir(tmp_path) -> Path:
    """Shards of flat 8x8x1 PNGs, labels id % 3: train ids 0..9 and 10..19 in two files,
    validation ids 20..23, test ids 24..29."""
    root = tmp_path / "records"
    root.mkdir()
    layout = {
        "train-00000-of-00002.tfrecord": range(0, 10),
        "train-00001-of-00002.tfrecord": range(10, 20),
        "validation-00000-of-00001.tfrecord": range(20, 24),
        "test-00000-of-00001.tfrecord": range(24, 30),
    }
    for name, ids in layout.items():
        write_records(root / name, [example(encode(flat_image(i)), i % 3) for i in ids])
    return root
