"""Versioned, atomic, verified export of the trained model to `<model_base>/<name>/<version>/`.

A version is written under `.export-<version>-<random>` (TF Serving only looks at all-digit
names), reloaded and checked against the in-memory model, then renamed into place. A version is
never overwritten, and a failed or interrupted export leaves no numeric directory behind.

Crash safety: an export given an `export_id` carries it inside the staged version
(`assets.extra/export_origin.json`), so the rename publishes the version and its origin at
once, and `find_export` tells a rerun which version an earlier, killed attempt published.
Staging directories left by killed exporters are removed by the next export (trainer/staging.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from convstack.common.files import fsync_path, fsync_tree, write_json_atomic
from convstack.trainer import (
    crash_points,
    model_card,
    preemption,
    signatures,
    staging,
    tflite_export,
    warmup,
)
from convstack.trainer.errors import ExportError, Preempted, VersionExistsError

logger = logging.getLogger(__name__)

VERIFY_BATCH = 64
VERIFY_IMAGE_BYTES = 4
# Reloaded vs in-memory probabilities: float32 graphs agree to rounding; bfloat16/float16
# compute only to a couple of significant digits.
FLOAT32_ATOL = 1e-5
MIXED_PRECISION_ATOL = 1e-2
_NUMERIC = re.compile(r"[0-9]+")
# Which export published a version: {"export_id": ...}, beside the model card.
ORIGIN_FILE = Path("assets.extra") / "export_origin.json"
# The Keras-native copy (keras.models.load_model reads it; Keras 3 cannot read a SavedModel).
# In assets.extra, which TF Serving and our server never load.
KERAS_FILE = Path("assets.extra") / "model.keras"


def _before_rename(temp_dir: Path) -> None:
    """Test-only hook, called after verification right before the rename into place.

    Tests replace it to simulate a crash (SIGKILL) or a concurrent exporter at that moment.
    """


def numeric_versions(model_dir: Path) -> list[int]:
    """Sorted versions of the all-digit child directories (`007` is 7); other names ignored."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(child.name)
        for child in model_dir.iterdir()
        if _NUMERIC.fullmatch(child.name) and child.is_dir()
    )


def next_version(model_dir: Path) -> int:
    """One more than the highest version in `model_dir`, or 1 if there is none."""
    versions = numeric_versions(model_dir)
    return versions[-1] + 1 if versions else 1


@dataclass(frozen=True)
class ExportResult:
    """A written version: its number, where it is, and its model card.

    For a non-chief worker `path` is the temporary directory it wrote and then removed.
    """

    version: int
    path: Path
    model_card: dict


def export_origin(version_dir: Path) -> str | None:
    """The export id a version was published with, or None (none recorded, or unreadable)."""
    try:
        origin = json.loads((Path(version_dir) / ORIGIN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return origin.get("export_id") if isinstance(origin, dict) else None


def find_export(model_dir: Path, export_id: str) -> ExportResult | None:
    """The version of `model_dir` published with `export_id`, if one was."""
    for version in numeric_versions(model_dir):
        path = _existing_version_path(Path(model_dir), version)
        if path is not None and export_origin(path) == export_id:
            return ExportResult(version, path, model_card.read_model_card(path))
    return None


def _write_origin(directory: Path, export_id: str) -> None:
    write_json_atomic(directory / ORIGIN_FILE, {"export_id": export_id})


def _version_path(model_dir: Path, version: int) -> Path:
    return model_dir / str(version)


def _existing_version_path(model_dir: Path, version: int) -> Path | None:
    # "7" and "007" are the same version to TF Serving.
    for child in model_dir.iterdir() if model_dir.is_dir() else ():
        if _NUMERIC.fullmatch(child.name) and int(child.name) == version:
            return child
    return None


def _raise_if_exists(model_dir: Path, version: int) -> None:
    existing = _existing_version_path(model_dir, version)
    if existing is not None:
        raise VersionExistsError(
            f"version {version} already exists at {existing}; versions are never overwritten"
        )


def _check_inputs(model: keras.Model, test_images: np.ndarray, test_labels: np.ndarray) -> None:
    shape = signatures.model_image_shape(model)
    if test_images.ndim != 4 or tuple(test_images.shape[1:]) != shape or len(test_images) == 0:
        raise ExportError(
            f"test_images must be [n>0, {', '.join(map(str, shape))}] like the model input; "
            f"got {list(test_images.shape)}"
        )
    if not (np.all(test_images >= 0.0) and np.all(test_images <= 1.0)):
        raise ExportError("test_images must hold values in [0, 1], as the signatures expect")
    if len(test_labels) != len(test_images):
        raise ExportError(f"{len(test_labels)} test labels for {len(test_images)} test images")


def _tolerance(model: keras.Model) -> float:
    return FLOAT32_ATOL if signatures.computes_in_float32(model) else MIXED_PRECISION_ATOL


def _expected_probabilities(model: keras.Model, images: np.ndarray) -> np.ndarray:
    logits = model(images, training=False)
    return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1).numpy()


def _serve(loaded, signature: str, **inputs) -> dict[str, np.ndarray]:
    outputs = loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    return {key: value.numpy() for key, value in outputs.items()}


def _check_outputs(outputs: dict[str, np.ndarray], batch: int, num_classes: int) -> None:
    probabilities, classes = outputs[signatures.PROBABILITIES], outputs[signatures.CLASSES]
    if probabilities.shape != (batch, num_classes) or probabilities.dtype != np.float32:
        raise ExportError(
            f"probabilities are {probabilities.dtype}{list(probabilities.shape)}, "
            f"expected float32[{batch}, {num_classes}]"
        )
    if classes.shape != (batch,) or classes.dtype != np.int64:
        raise ExportError(f"classes are {classes.dtype}{list(classes.shape)}, expected int64")


def _compare(what: str, got: np.ndarray, expected: np.ndarray, atol: float) -> None:
    difference = float(np.max(np.abs(got - expected)))
    if not difference <= atol:  # also catches NaN
        raise ExportError(f"{what}: max |difference| {difference:.3g} exceeds {atol:g}")


def _verify_images(loaded, model: keras.Model, images: np.ndarray, atol: float) -> None:
    expected = _expected_probabilities(model, images)
    outputs = _serve(loaded, signatures.SERVING_DEFAULT, **{signatures.IMAGES: images})
    _check_outputs(outputs, len(images), expected.shape[-1])
    _compare(
        "reloaded serving_default vs in-memory model",
        outputs[signatures.PROBABILITIES],
        expected,
        atol,
    )
    argmax = np.argmax(outputs[signatures.PROBABILITIES], axis=-1)
    if not np.array_equal(outputs[signatures.CLASSES], argmax):
        raise ExportError("serving_default classes are not the argmax of its probabilities")


def _verify_image_bytes(loaded, images: np.ndarray, atol: float) -> None:
    encoded = signatures.encode_png(images)
    decoded = signatures.decode_png(encoded)
    reference = _serve(loaded, signatures.SERVING_DEFAULT, **{signatures.IMAGES: decoded})
    outputs = _serve(
        loaded,
        signatures.PREDICT_IMAGE_BYTES,
        **{signatures.IMAGE_BYTES: np.array(encoded, dtype=object)},
    )
    _check_outputs(outputs, len(images), reference[signatures.PROBABILITIES].shape[-1])
    _compare(
        "predict_image_bytes vs serving_default on the decoded PNGs",
        outputs[signatures.PROBABILITIES],
        reference[signatures.PROBABILITIES],
        atol,
    )
    if not np.array_equal(outputs[signatures.CLASSES], reference[signatures.CLASSES]):
        raise ExportError("predict_image_bytes and serving_default disagree on classes")


def verify_saved_model(loaded, model: keras.Model, test_images: np.ndarray) -> None:
    """ExportError unless the reloaded signatures reproduce the in-memory model."""
    atol = _tolerance(model)
    _verify_images(loaded, model, test_images[:VERIFY_BATCH], atol)
    _verify_image_bytes(loaded, test_images[:VERIFY_IMAGE_BYTES], atol)


def _classes(loaded, images: np.ndarray) -> np.ndarray:
    outputs = _serve(loaded, signatures.SERVING_DEFAULT, **{signatures.IMAGES: images})
    return outputs[signatures.CLASSES]


def saved_model_classes(loaded, images: np.ndarray) -> np.ndarray:
    """int64 [n] classes of the loaded SavedModel's serving_default, in batches of ~256."""
    batches = np.array_split(images, max(1, len(images) // 256))
    return np.concatenate([_classes(loaded, batch) for batch in batches])


def write_keras_model(model: keras.Model, directory: Path) -> Path:
    """Write the Keras-native model file `<directory>/assets.extra/model.keras` (config and
    weights; Keras adds a compiled model's optimizer state); return its path."""
    path = directory / KERAS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def keras_probabilities(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """float32 softmax probabilities of a Keras classifier (float32 logits) on `images`."""
    return _expected_probabilities(model, images)


def verify_keras_model(path: Path, loaded, model: keras.Model, test_images: np.ndarray) -> None:
    """ExportError unless keras.models.load_model(path) gives serving_default's outputs on the
    test batch: probabilities within the export tolerance, the same classes."""
    try:
        reloaded = keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types on a bad archive
        raise ExportError(f"{path}: keras.models.load_model fails: {exc}") from exc
    images = test_images[:VERIFY_BATCH]
    served = _serve(loaded, signatures.SERVING_DEFAULT, **{signatures.IMAGES: images})
    probabilities = keras_probabilities(reloaded, images)
    _compare(
        "model.keras reloaded vs SavedModel serving_default",
        probabilities,
        served[signatures.PROBABILITIES],
        _tolerance(model),
    )
    if not np.array_equal(np.argmax(probabilities, axis=-1), served[signatures.CLASSES]):
        raise ExportError("model.keras and serving_default disagree on classes")


def _write_and_verify(
    model: keras.Model,
    directory: Path,
    *,
    model_name: str,
    version: int,
    parent_version: int | None,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    representative_images: np.ndarray,
    card_fields: Mapping,
    tflite: str | None,
) -> dict:
    """Write SavedModel, warmup, Keras file, optional TFLite and model card into `directory`;
    verify each against the in-memory model or the reloaded SavedModel."""
    signatures.write_saved_model(model, directory)
    records = warmup.build_warmup_records(model_name, test_images)
    if tflite is not None:
        records = _tflite_servable_records(records)
    warmup.write_warmup_records(directory / warmup.WARMUP_FILE, records)

    loaded = tf.saved_model.load(str(directory))
    verify_saved_model(loaded, model, test_images)
    warmup.replay_warmup_records(loaded, records)
    verify_keras_model(write_keras_model(model, directory), loaded, model, test_images)

    card = model_card.build_model_card(
        card_fields,
        model_name=model_name,
        version=version,
        parent_version=parent_version,
        signatures=signatures.describe_signatures(loaded),
        image_shape=signatures.model_image_shape(model),
        tensorflow_version=tf.__version__,
        keras_version=keras.__version__,
    )
    if tflite is not None:
        section = tflite_export.export_tflite(
            directory,
            quantization=tflite,
            model=model,
            representative_images=representative_images,
            test_images=test_images,
            test_labels=test_labels,
            saved_model_classes=saved_model_classes(loaded, test_images),
        )
        card = model_card.with_tflite(card, section)
    model_card.write_model_card(directory, card)
    return card


def _tflite_servable_records(records: list) -> list:
    """The warmup records a TFLite version can run: `serving_default` only.

    TF Serving replays the same warmup file for a version served from model.tflite
    (saved_model_bundle_source_adapter.cc), and a record naming a signature the servable lacks
    fails the load; the TFLite model has no `predict_image_bytes` (no image decoding in TFLite's
    builtin ops). The SavedModel then warms up serving_default only.
    """
    return [
        record
        for record in records
        if record.predict_log.request.model_spec.signature_name == signatures.SERVING_DEFAULT
    ]


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _rename_no_replace(source: Path, target: Path) -> None:
    """rename(2) that fails with EEXIST even when `target` is an empty directory.

    Plain rename silently replaces an empty directory, so a concurrent exporter that has just
    created `<version>/` could lose it. Linux's renameat2(RENAME_NOREPLACE) closes that gap;
    where it is missing (other systems, some file systems) plain rename is the fallback.
    """
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc is not None else None
    if renameat2 is not None:
        result = renameat2(
            _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
        )
        if result == 0:
            return
        error = ctypes.get_errno()
        if error not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(error, os.strerror(error), str(target))
    os.rename(source, target)


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _publish(temp_dir: Path, model_dir: Path, version: int) -> Path:
    """Rename the verified temp dir to `<version>`; VersionExistsError if someone else won."""
    _raise_if_exists(model_dir, version)
    target = _version_path(model_dir, version)
    try:
        _rename_no_replace(temp_dir, target)
        crash_points.reached("renamed")
    except OSError as exc:
        # A non-empty target makes rename(2) fail: a concurrent exporter got there first.
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise VersionExistsError(
                f"version {version} already exists at {target}; versions are never overwritten"
            ) from exc
        raise
    fsync_path(model_dir)  # makes the rename itself durable
    return target


def _choose_version(model_dir: Path, version: int | None, is_chief: bool) -> int:
    if version is None:
        return next_version(model_dir)
    if isinstance(version, bool) or int(version) != version or version < 1:
        raise ExportError(f"version must be a positive integer, got {version!r}")
    if is_chief:  # a non-chief never publishes, so an existing version is no obstacle
        _raise_if_exists(model_dir, int(version))
    return int(version)  # numpy integers from callers would not survive json or str()


def _make_temp_dir(model_dir: Path, version: int, is_chief: bool) -> Path:
    if not is_chief:
        # Non-chief workers write outside the model repository, so they can never collide
        # with the chief's version or leave anything a server might see.
        return Path(tempfile.mkdtemp(prefix=f"convstack-export-{version}-worker-"))
    return Path(tempfile.mkdtemp(prefix=f"{staging.PREFIX}{version}-", dir=model_dir))


def export_version(
    model: keras.Model,
    *,
    model_base: str | Path,
    model_name: str,
    version: int | None,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    representative_images: np.ndarray,
    card_fields: dict,
    tflite: str | None = None,
    is_chief: bool = True,
    export_id: str | None = None,
) -> ExportResult:
    """Export `model` (float32 logits) as `<model_base>/<model_name>/<version>/`.

    `version=None` takes the next free version. Writes the SavedModel with `serving_default`
    and `predict_image_bytes`, the warmup requests, the Keras-native `assets.extra/model.keras`,
    the model card and (with `tflite` = "float32", "float16" or "int8") `model.tflite` into a
    temporary directory, verifies the reloaded model against `model` and the Keras file and
    TFLite model against the reloaded one, then renames it into place. Raises
    VersionExistsError if the version exists (never overwrites) and ExportError on any other
    failure, leaving no numeric directory behind. A non-chief
    worker (`is_chief=False`) does the same work (minus TFLite, which is chief-only
    post-processing) in a temporary directory it then removes. `export_id` is recorded in the
    published version, for `find_export` (the caller checks it was not published before).
    """
    model_dir = Path(model_base) / model_name
    test_images = np.asarray(test_images, np.float32)
    _check_inputs(model, test_images, np.asarray(test_labels))
    model_card.validate_card_fields(card_fields)
    if tflite is not None and tflite not in tflite_export.QUANTIZATIONS:
        raise ExportError(
            f"tflite must be None or one of {', '.join(tflite_export.QUANTIZATIONS)}; "
            f"got {tflite!r}"
        )

    existing = numeric_versions(model_dir)
    job = _Job(
        model=model,
        model_dir=model_dir,
        model_name=model_name,
        version=_choose_version(model_dir, version, is_chief),
        parent_version=existing[-1] if existing else None,
        test_images=test_images,
        test_labels=test_labels,
        representative_images=representative_images,
        card_fields=card_fields,
        tflite=tflite if is_chief else None,
        is_chief=is_chief,
        export_id=export_id,
    )
    if not is_chief:
        return _stage_and_publish(job)
    model_dir.mkdir(parents=True, exist_ok=True)
    with staging.staging_lock(model_dir):
        return _stage_and_publish(job)


@dataclass(frozen=True)
class _Job:
    """One export_version call, its arguments checked and its version chosen."""

    model: keras.Model
    model_dir: Path
    model_name: str
    version: int
    parent_version: int | None
    test_images: np.ndarray
    test_labels: np.ndarray
    representative_images: np.ndarray
    card_fields: dict
    tflite: str | None
    is_chief: bool
    export_id: str | None


def _stage_and_publish(job: _Job) -> ExportResult:
    """Write and verify the version in a staging directory, then rename it into place (the
    chief) or remove it (a non-chief); the staging directory never outlives a failure."""
    temp_dir = _make_temp_dir(job.model_dir, job.version, job.is_chief)
    crash_points.reached("staging-created")
    logger.info("Exporting %s version %d into %s", job.model_name, job.version, temp_dir)
    try:
        card = _write_and_verify(
            job.model,
            temp_dir,
            model_name=job.model_name,
            version=job.version,
            parent_version=job.parent_version,
            test_images=job.test_images,
            test_labels=job.test_labels,
            representative_images=job.representative_images,
            card_fields=job.card_fields,
            tflite=job.tflite,
        )
        # The last safe point before publishing: a SIGTERM while writing stops here, and the
        # finally below removes the staged version (a rerun exports it again).
        preemption.stop_if_requested(
            "export", "the staged version was removed; rerun with the same --run-dir to export"
        )
        if not job.is_chief:
            logger.info("Non-chief export of version %d verified; removing %s", job.version,
                        temp_dir)  # fmt: skip
            return ExportResult(job.version, temp_dir, card)
        if job.export_id is not None:
            # Inside the staged tree, so that the rename publishes the version and its origin
            # together: no moment exists where the version is out but nobody knows whose it is.
            _write_origin(temp_dir, job.export_id)
        crash_points.reached("staged")
        _before_rename(temp_dir)
        fsync_tree(temp_dir)
        crash_points.reached("tree-synced")
        final = _publish(temp_dir, job.model_dir, job.version)
    except (ExportError, Preempted):
        raise
    except Exception as exc:
        raise ExportError(
            f"export of {job.model_name} version {job.version} failed: {exc}"
        ) from exc
    finally:
        # Removes the temp dir on failure (and always for non-chief); after a successful
        # rename it no longer exists.
        shutil.rmtree(temp_dir, ignore_errors=True)
    logger.info("Exported %s version %d to %s", job.model_name, job.version, final)
    return ExportResult(job.version, final, card)
