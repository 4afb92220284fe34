"""A tiny trained classifier and synthetic data for the export tests (not a test module).

Class k is a bright 6x6 square at the k-th of ten positions on a noisy 28x28x1 image, so a
Conv2D -> Dense model learns it to near 100% in a second.
"""

from __future__ import annotations

import functools
import os
import select
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import keras
import numpy as np

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
_CORNERS = [(row, col) for row in (1, 6, 11, 16, 21) for col in (3, 17)]


def synthetic_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 images [n, 28, 28, 1] in [0, 1] and int64 labels [n]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, size=n)
    images = rng.uniform(0.0, 0.3, size=(n, *IMAGE_SHAPE)).astype(np.float32)
    for image, label in zip(images, labels, strict=True):
        row, col = _CORNERS[label]
        image[row : row + 6, col : col + 6, 0] = rng.uniform(0.7, 1.0)
    return images, labels.astype(np.int64)


def build_tiny_model() -> keras.Model:
    """Conv2D(4) -> Flatten -> Dense(10) logits, float32, with dropout (inactive at serving)."""
    images = keras.Input(shape=IMAGE_SHAPE, name="images")
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(images)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.2)(x)
    logits = keras.layers.Dense(NUM_CLASSES, dtype="float32", name="logits")(x)
    return keras.Model(images, logits)


@functools.lru_cache(maxsize=1)
def trained_model() -> keras.Model:
    """The tiny model trained for a few epochs (shared, read-only across tests)."""
    keras.utils.set_random_seed(0)
    model = build_tiny_model()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    images, labels = synthetic_data(512, seed=1)
    model.fit(images, labels, epochs=4, batch_size=32, verbose=0)
    return model


@functools.lru_cache(maxsize=1)
def held_out_data() -> tuple[np.ndarray, np.ndarray]:
    """Held-out images and labels."""
    return synthetic_data(160, seed=2)


def card_fields() -> dict:
    """What the trainer passes as `card_fields` (numpy values included on purpose)."""
    return {
        "dataset": {
            "uri": "synthetic:squares",
            "fingerprint": "sha256:0123abcd",
            "splits": {"train": 512, "validation": 0, "test": 160},
            "class_names": [str(k) for k in range(NUM_CLASSES)],
            "image_shape": IMAGE_SHAPE,
        },
        "test_metrics": {"accuracy": np.float32(0.99), "loss": 0.05},
        "training": {
            "config": {"epochs": 4, "batch_size": 32, "learning_rate": 0.01},
            "strategy": "OneDeviceStrategy",
            "replicas": 1,
            "epochs": 4,
            "global_steps": 64,
            "seconds": 1.5,
        },
    }


def export_kwargs(model_base: Path, **overrides) -> dict:
    """Keyword arguments of export_version for the tiny model's data; override any."""
    images, labels = held_out_data()
    kwargs = {
        "model_base": model_base,
        "model_name": "tiny",
        "version": None,
        "test_images": images,
        "test_labels": labels,
        "representative_images": synthetic_data(200, seed=3)[0],
        "card_fields": card_fields(),
    }
    kwargs.update(overrides)
    return kwargs


ROOT = Path(__file__).resolve().parents[2]
# An exporter of the tiny model that stops just before its rename, says where it stages, and
# waits there (for the test to kill it).
_PAUSED_EXPORT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tests.trainer import export_helpers as helpers
    from convstack.trainer import export

    def pause(temp_dir):
        print("READY", temp_dir, flush=True)
        time.sleep(600)

    export._before_rename = pause
    export.export_version(helpers.build_tiny_model(), **helpers.export_kwargs(Path(sys.argv[1])))
    """
)


def start_paused_export(model_base: Path, timeout: float) -> tuple[subprocess.Popen, Path]:
    """A subprocess exporting into `model_base`, paused before its rename: the process and its
    staging directory, once it is there. The caller kills the process."""
    process = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_EXPORT, str(model_base)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            if line.startswith("READY"):
                return process, Path(line.split()[1])
            if not line:
                break
    process.kill()
    raise AssertionError(f"exporter never printed READY: {process.stderr.read()[-2000:]}")


def png_declaring(width: int, height: int) -> bytes:
    """A valid greyscale PNG of `width` x `height` black pixels, built row by row so that a
    header declaring hundreds of megapixels costs a few hundred kilobytes and no big buffer."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + width)  # filter byte 0, then the row's pixels
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
