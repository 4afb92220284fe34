"""Datasets: a URI in, train/validation/test splits of (image, label) out.

    digits          scikit-learn's bundled 8x8 digits, 0..16 scaled to [0, 1] and resized to
                    28x28x1 (the offline default); split seeded and stratified
    npz:PATH        MNIST-format arrays x_train, y_train, x_test, y_test; validation carved
                    from the training arrays
    images:DIR      DIR/<class>/*.png|*.jpg, one sub-folder per class (sorted names are the
                    labels); split seeded and stratified
    tfrecord:GLOB   shards whose names start with train-, validation- or test-, read lazily
                    (schema in trainer.tfrecords)

Every split yields (image float32 [H, W, C] in [0, 1], label int64) in a fixed order. The first
three sources are held in memory; TFRecord shards are scanned once on load (counts, shape,
labels) and then streamed. Bad data raises DataError with one line naming the file.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError
from PIL import Image

from convstack.trainer import tfrecords
from convstack.trainer.errors import DataError
from convstack.trainer.tfrecords import SPLITS  # the split names are part of the record format

__all__ = ["SPLITS", "Dataset", "DatasetInfo", "load_dataset"]

log = logging.getLogger(__name__)

DIGITS_SIZE = 28  # MNIST's size, so digits models and MNIST models take the same input
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Bumping this changes every fingerprint: do it when the meaning of loaded data changes.
_FINGERPRINT_VERSION = b"convstack-dataset/1"
_GRAY_MODES = ("1", "L", "LA")
_COLOR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr")

Arrays = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DatasetInfo:
    """What a loaded dataset holds; `to_json()` goes into the model card."""

    uri: str
    source: str
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]
    fingerprint: str

    def to_json(self) -> dict:
        """A plain-JSON dict of every field."""
        return {
            "uri": self.uri,
            "source": self.source,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "split_sizes": dict(self.split_sizes),
            "fingerprint": self.fingerprint,
        }


class Dataset:
    """A loaded dataset: its info and its three splits, as arrays in memory or TFRecord files."""

    def __init__(
        self,
        info: DatasetInfo,
        *,
        arrays: Mapping[str, Arrays] | None = None,
        files: Mapping[str, list[str]] | None = None,
    ):
        if (arrays is None) == (files is None):
            raise ValueError("a Dataset holds either arrays or files")
        self.info = info
        # Sharded across workers by DATA when in memory, by FILE when read from TFRecords.
        self.in_memory = arrays is not None
        self._arrays = dict(arrays or {})
        self._files = {name: list(paths) for name, paths in (files or {}).items()}

    def split(self, name: str) -> tf.data.Dataset:
        """The examples of one split, unbatched, always in the same order."""
        _check_split_name(name)
        if self.in_memory:
            return tf.data.Dataset.from_tensor_slices(self._arrays[name])
        return tfrecords.read_examples(self._files[name], self.info.image_shape)

    def arrays(self, name: str, limit: int | None = None) -> Arrays:
        """The first `limit` (default all) examples of a split: float32 [N, H, W, C], int64 [N].

        In-memory arrays are returned as read-only views.
        """
        _check_split_name(name)
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if self.in_memory:
            images, labels = self._arrays[name]
            return images[:limit], labels[:limit]
        examples = self.split(name)
        if limit is not None:
            examples = examples.take(limit)
        batches = list(examples.batch(1024).as_numpy_iterator())
        if not batches:
            return np.zeros((0, *self.info.image_shape), np.float32), np.zeros((0,), np.int64)
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    def files(self, name: str) -> list[str]:
        """A TFRecord split's shard files, in reading order; [] for in-memory sources."""
        _check_split_name(name)
        return list(self._files.get(name, []))


def _check_split_name(name: str) -> None:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")


def load_dataset(
    uri: str, *, seed: int = 42, validation_fraction: float = 0.1, test_fraction: float = 0.2
) -> Dataset:
    """Load `uri` (digits | npz:PATH | images:DIR | tfrecord:GLOB) into its three splits.

    `seed` and the fractions decide the split of digits and image folders (test_fraction and
    validation_fraction of all examples) and of npz files (validation_fraction of x_train;
    x_test is the test split). TFRecord shards carry their split in their file names.
    """
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1):
        raise ValueError("validation_fraction and test_fraction must be in [0, 1)")
    if validation_fraction + test_fraction >= 1:
        raise ValueError("validation_fraction + test_fraction must be below 1")
    fractions = (validation_fraction, test_fraction)
    if uri == "digits":
        return _load_digits(uri, seed, *fractions)
    scheme, _, target = uri.partition(":")
    if scheme not in ("npz", "images", "tfrecord") or not target:
        raise DataError(
            f"{uri}: not a dataset URI; expected digits, npz:PATH, images:DIR or tfrecord:GLOB"
        )
    if scheme == "npz":
        return _load_npz(uri, Path(target), seed, validation_fraction)
    if scheme == "images":
        return _load_images(uri, Path(target), seed, *fractions)
    return _load_tfrecord(uri, target)


# --- splitting and fingerprints -------------------------------------------------------------


def _held_out(total: int, fraction: float) -> int:
    # Round half up; a fraction too small for the data leaves the split empty (a DataError).
    return int(total * fraction + 0.5)


def _carve(indices: np.ndarray, labels: np.ndarray, count: int, seed: int) -> Arrays:
    """Split `indices` into (rest, `count` taken at random), stratified by label when possible."""
    from sklearn.model_selection import train_test_split

    if count <= 0:
        return indices, indices[:0]
    if count >= len(indices):
        return indices[:0], indices
    try:
        rest, taken = train_test_split(
            indices, test_size=count, random_state=seed, stratify=labels[indices]
        )
    except ValueError:
        # Stratifying needs two examples per class and a held-out slot per class; tiny
        # datasets get a plain seeded shuffle instead.
        rest, taken = train_test_split(indices, test_size=count, random_state=seed)
    return np.sort(rest), np.sort(taken)


def _three_way(labels: np.ndarray, seed: int, validation_fraction: float, test_fraction: float):
    """Index arrays of train/validation/test, each a share of all examples."""
    total = len(labels)
    rest, test = _carve(np.arange(total), labels, _held_out(total, test_fraction), seed)
    train, validation = _carve(rest, labels, _held_out(total, validation_fraction), seed)
    return {"train": train, "validation": validation, "test": test}


def _hasher(source: str) -> hashlib._Hash:
    hasher = hashlib.sha256(_FINGERPRINT_VERSION)
    _update(hasher, source.encode())
    return hasher


def _update(hasher: hashlib._Hash, *chunks: bytes) -> None:
    # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    for chunk in chunks:
        hasher.update(len(chunk).to_bytes(8, "little"))
        hasher.update(chunk)


def _hash_file(hasher: hashlib._Hash, path: str | Path) -> None:
    """Stream a file into the hash (TFRecord shards and npz files can be large)."""
    hasher.update(os.path.getsize(path).to_bytes(8, "little"))
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            hasher.update(block)


def _hash_indices(hasher: hashlib._Hash, parts: Mapping[str, np.ndarray]) -> None:
    for name in SPLITS:
        _update(hasher, name.encode(), np.asarray(parts[name], np.int64).tobytes())


def _in_memory(
    uri: str, source: str, splits: dict[str, Arrays], class_names: list[str], fingerprint: str
) -> Dataset:
    for name in SPLITS:
        if len(splits[name][1]) == 0:
            raise DataError(f"{uri}: the {name} split is empty")
    for images, labels in splits.values():
        images.setflags(write=False)
        labels.setflags(write=False)
    info = DatasetInfo(
        uri=uri,
        source=source,
        image_shape=tuple(int(d) for d in splits["train"][0].shape[1:]),
        num_classes=len(class_names),
        class_names=tuple(class_names),
        split_sizes={name: len(splits[name][1]) for name in SPLITS},
        fingerprint=fingerprint,
    )
    log.info("%s: %s", uri, ", ".join(f"{n} {s}" for n, s in info.split_sizes.items()))
    return Dataset(info, arrays={name: splits[name] for name in SPLITS})


def _take(images: np.ndarray, labels: np.ndarray, parts: Mapping[str, np.ndarray]):
    return {name: (images[idx], labels[idx]) for name, idx in parts.items()}


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _inconsistent(first: tuple[str, tuple], where: str, shape: tuple) -> DataError:
    return DataError(
        f"inconsistent image shapes: {first[0]} is {_shape_text(first[1])} "
        f"but {where} is {_shape_text(shape)}"
    )


# --- digits ---------------------------------------------------------------------------------


def _load_digits(uri: str, seed: int, validation_fraction: float, test_fraction: float):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = np.asarray(bunch.images, np.float32)[..., np.newaxis] / 16.0
    images = tf.image.resize(raw, (DIGITS_SIZE, DIGITS_SIZE)).numpy()
    # Bilinear interpolation of [0, 1] values stays in [0, 1] up to float rounding.
    images = np.clip(images, 0.0, 1.0)
    labels = np.asarray(bunch.target, np.int64)
    parts = _three_way(labels, seed, validation_fraction, test_fraction)
    hasher = _hasher("digits")
    _update(hasher, np.ascontiguousarray(bunch.images).tobytes(), labels.tobytes())
    _hash_indices(hasher, parts)
    names = [str(i) for i in range(10)]
    return _in_memory(uri, "digits", _take(images, labels, parts), names, hasher.hexdigest())


# --- npz ------------------------------------------------------------------------------------


def _load_npz(uri: str, path: Path, seed: int, validation_fraction: float) -> Dataset:
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    raw = _read_npz(path)
    x_train = _npz_images(path, "x_train", raw["x_train"])
    x_test = _npz_images(path, "x_test", raw["x_test"])
    y_train = _labels(raw["y_train"], f"{path}: y_train")
    y_test = _labels(raw["y_test"], f"{path}: y_test")
    for x_key, x, y in (("x_train", x_train, y_train), ("x_test", x_test, y_test)):
        if len(x) != len(y):
            y_key = "y" + x_key[1:]
            raise DataError(f"{path}: {x_key} has {len(x)} images but {y_key} has {len(y)} labels")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise _inconsistent((f"{path}: x_train", x_train.shape[1:]), "x_test", x_test.shape[1:])
    train, validation = _carve(
        np.arange(len(y_train)), y_train, _held_out(len(y_train), validation_fraction), seed
    )
    hasher = _hasher("npz")
    _hash_file(hasher, path)
    _hash_indices(
        hasher, {"train": train, "validation": validation, "test": np.arange(len(y_test))}
    )
    splits = {
        "train": (x_train[train], y_train[train]),
        "validation": (x_train[validation], y_train[validation]),
        "test": (x_test, y_test),
    }
    num_classes = max((int(y.max()) + 1 for y in (y_train, y_test) if y.size), default=0)
    names = [str(i) for i in range(num_classes)]
    return _in_memory(uri, "npz", splits, names, hasher.hexdigest())


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises a zoo here: BadZipFile, ValueError, EOFError, ...
        raise DataError(f"{path}: not a readable .npz file: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single .npy array, expected an .npz with {', '.join(NPZ_KEYS)}")
    with archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise DataError(
                f"{path}: missing keys {', '.join(missing)} (an MNIST-format .npz holds "
                f"{', '.join(NPZ_KEYS)})"
            )
        arrays = {}
        for key in NPZ_KEYS:
            try:
                arrays[key] = archive[key]
            except Exception as exc:  # corrupt member or an object array (needs pickle)
                raise DataError(f"{path}: cannot read {key}: {exc}") from exc
    return arrays


def _npz_images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """[N, H, W] or [N, H, W, C] of uint 0..255 or float [0, 1] -> float32 [N, H, W, C]."""
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4:
        raise DataError(f"{path}: {key} has shape {x.shape}; expected [N, H, W] or [N, H, W, C]")
    low, high = (x.min(), x.max()) if x.size else (0, 0)
    if np.issubdtype(x.dtype, np.integer):
        if low < 0 or high > 255:
            raise DataError(
                f"{path}: {key} has integer values {low}..{high}, outside 0..255 (8-bit pixels)"
            )
        return x.astype(np.float32) / 255.0
    if np.issubdtype(x.dtype, np.floating):
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= 1):
            raise DataError(
                f"{path}: {key} has {x.dtype} values {low:g}..{high:g}, outside [0, 1] "
                "(store floats scaled to [0, 1] or integers 0..255)"
            )
        return x.astype(np.float32)
    raise DataError(f"{path}: {key} has dtype {x.dtype}; expected integers 0..255 or floats")


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    """Class labels as int64 [N]; rejects negative and non-integer values."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where}: labels have shape {y.shape}; expected [N]")
    if np.issubdtype(y.dtype, np.floating):
        fractional = ~np.isfinite(y) | (y != np.round(y))
        if fractional.any():
            raise DataError(
                f"{where}: label {y[fractional][0]} is not an integer (labels are 0..K-1)"
            )
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels have dtype {y.dtype}; expected integers 0..K-1")
    labels = y.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{where}: label {labels.min()} is negative (labels are 0..K-1)")
    return labels


# --- image folders --------------------------------------------------------------------------


def _decode_image(data: bytes, where: str) -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 [H, W, C]: grayscale -> C=1, colour -> C=3 (alpha dropped)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            kind, mode = image.format, image.mode
            if kind in ("PNG", "JPEG") and mode in _GRAY_MODES:
                pixels = np.asarray(image.convert("L"))[..., np.newaxis]
            elif kind in ("PNG", "JPEG") and mode in _COLOR_MODES:
                pixels = np.asarray(image.convert("RGB"))
            else:
                pixels = None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
        raise DataError(f"{where}: cannot decode image: {exc}") from exc
    if pixels is None:
        raise DataError(
            f"{where}: unsupported image ({kind} {mode}); expected 8-bit grayscale or RGB "
            "PNG or JPEG"
        )
    return pixels


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from exc


def _load_images(
    uri: str, root: Path, seed: int, validation_fraction: float, test_fraction: float
) -> Dataset:
    if not root.is_dir():
        raise DataError(
            f"{root}: no such directory" if not root.exists() else f"{root}: not a directory"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected DIR/<class>/*.png|*.jpg)")
    hasher = _hasher("images")
    images, labels = [], []
    first = None  # (file, shape) that every other image must match
    for label, name in enumerate(classes):
        for path in _class_files(root / name):
            data = _read_bytes(path)
            _update(hasher, f"{name}/{path.name}".encode(), data)
            pixels = _decode_image(data, str(path))
            first = first or (str(path), pixels.shape)
            if pixels.shape != first[1]:
                raise _inconsistent(first, str(path), pixels.shape)
            images.append(pixels)
            labels.append(label)
    x = np.stack(images).astype(np.float32) / 255.0
    y = np.asarray(labels, np.int64)
    parts = _three_way(y, seed, validation_fraction, test_fraction)
    _hash_indices(hasher, parts)
    return _in_memory(uri, "images", _take(x, y, parts), classes, hasher.hexdigest())


def _class_files(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DataError(f"{folder}: class folder has no .png, .jpg or .jpeg files")
    return files


# --- TFRecord shards ------------------------------------------------------------------------


def _load_tfrecord(uri: str, pattern: str) -> Dataset:
    files = _match_files(pattern)
    by_split = _files_by_split(files)
    metadata = _find_metadata(files)
    scan = _Scan(metadata)
    for name in SPLITS:
        for path in by_split[name]:
            scan.file(name, path)
    for name in SPLITS:
        if scan.sizes[name] == 0:
            raise DataError(f"{uri}: the {name} split is empty (no records in {name}-* files)")
    if metadata is not None:
        meta = metadata[1]
        num_classes, names, shape = meta.num_classes, meta.class_names, meta.image_shape
    else:
        num_classes = scan.max_label + 1
        names, shape = tuple(str(i) for i in range(num_classes)), scan.first[1]
    info = DatasetInfo(
        uri=uri,
        source="tfrecord",
        image_shape=tuple(shape),
        num_classes=num_classes,
        class_names=tuple(names),
        split_sizes=dict(scan.sizes),
        fingerprint=scan.hasher.hexdigest(),
    )
    log.info(
        "%s: %d files, %s", uri, len(files), ", ".join(f"{n} {s}" for n, s in scan.sizes.items())
    )
    return Dataset(info, files=by_split)


def _match_files(pattern: str) -> list[str]:
    if os.path.isdir(pattern):  # `tfrecord:DIR` means the shards in DIR
        pattern = os.path.join(pattern, "*.tfrecord")
    matches = sorted(
        p
        for p in glob.glob(pattern)
        if os.path.isfile(p) and os.path.basename(p) != tfrecords.DATASET_JSON
    )
    if matches:
        return matches
    if not any(char in pattern for char in "*?["):
        raise DataError(f"{pattern}: no such file")
    parent = os.path.dirname(pattern)
    if parent and not any(char in parent for char in "*?[") and not os.path.isdir(parent):
        raise DataError(f"{pattern}: no files match ({parent}: no such directory)")
    raise DataError(f"{pattern}: no files match")


def _files_by_split(files: list[str]) -> dict[str, list[str]]:
    by_split: dict[str, list[str]] = {name: [] for name in SPLITS}
    for path in files:
        base = os.path.basename(path)
        split = next((name for name in SPLITS if base.startswith(f"{name}-")), None)
        if split is None:
            raise DataError(
                f"{path}: cannot tell its split; TFRecord file names start with "
                "train-, validation- or test-"
            )
        by_split[split].append(path)
    return by_split


def _find_metadata(files: list[str]) -> tuple[str, tfrecords.Metadata] | None:
    """The dataset.json beside the shards, if any; all found must agree."""
    folders = sorted({os.path.dirname(os.path.abspath(p)) for p in files})
    found = [
        (path, tfrecords.read_metadata(path))
        for folder in folders
        if os.path.isfile(path := os.path.join(folder, tfrecords.DATASET_JSON))
    ]
    for path, metadata in found[1:]:
        if metadata != found[0][1]:
            raise DataError(f"{path}: disagrees with {found[0][0]} about the dataset")
    return found[0] if found else None


class _Scan:
    """One pass over the shards: counts, image shape, labels, and the fingerprint."""

    def __init__(self, metadata: tuple[str, tfrecords.Metadata] | None):
        self.metadata = metadata
        self.sizes = dict.fromkeys(SPLITS, 0)
        self.max_label = -1
        self.first = None if metadata is None else (metadata[0], metadata[1].image_shape)
        self.hasher = _hasher("tfrecord")
        if metadata is not None:
            meta = metadata[1]
            _update(
                self.hasher, repr((meta.num_classes, meta.class_names, meta.image_shape)).encode()
            )

    def file(self, split: str, path: str) -> None:
        _update(self.hasher, os.path.basename(path).encode())
        _hash_file(self.hasher, path)
        for index, record in enumerate(_records(path)):
            self.record(record, f"{path} record {index}")
            self.sizes[split] += 1

    def record(self, record: bytes, where: str) -> None:
        image, label = _parse_record(record, where)
        if label < 0:
            raise DataError(f"{where}: label {label} is negative (labels are 0..K-1)")
        if self.metadata is not None and label >= self.metadata[1].num_classes:
            k = self.metadata[1].num_classes
            raise DataError(
                f"{where}: label {label} is outside 0..{k - 1} ({self.metadata[0]} has "
                f"num_classes {k})"
            )
        self.max_label = max(self.max_label, label)
        shape = _decode_image(image, where).shape
        self.first = self.first or (where, shape)
        if shape != tuple(self.first[1]):
            raise _inconsistent(self.first, where, shape)


def _records(path: str) -> Iterator[bytes]:
    try:
        yield from tf.data.TFRecordDataset(path).as_numpy_iterator()
    except tf.errors.OpError as exc:  # DataLossError for a truncated or corrupt file
        raise DataError(
            f"{path}: not a readable TFRecord file: {exc.message.splitlines()[0]}"
        ) from exc


def _parse_record(record: bytes, where: str) -> tuple[bytes, int]:
    try:
        example = tf.train.Example.FromString(record)
    except DecodeError as exc:
        raise DataError(f"{where}: not a tf.train.Example: {exc}") from exc
    features = example.features.feature
    image = features.get(tfrecords.IMAGE_KEY)
    if (
        image is None
        or image.WhichOneof("kind") != "bytes_list"
        or len(image.bytes_list.value) != 1
    ):
        raise DataError(f"{where}: needs an 'image' feature holding one encoded PNG or JPEG")
    label = features.get(tfrecords.LABEL_KEY)
    if (
        label is None
        or label.WhichOneof("kind") != "int64_list"
        or len(label.int64_list.value) != 1
    ):
        kind = "missing" if label is None else label.WhichOneof("kind")
        raise DataError(f"{where}: needs a 'label' feature holding one int64 (got {kind})")
    return image.bytes_list.value[0], int(label.int64_list.value[0])
