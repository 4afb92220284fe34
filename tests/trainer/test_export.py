"""Versioned, atomic, verified export: trainer/export.py (real TensorFlow, tiny model)."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
from datetime import datetime
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from convstack.trainer import export, model_card, signatures, tflite_export, warmup
from convstack.trainer.errors import ExportError, VersionExistsError
from tests.trainer import export_helpers as helpers


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return helpers.trained_model()


@pytest.fixture(scope="module")
def repo(model, tmp_path_factory) -> tuple[Path, export.ExportResult, export.ExportResult]:
    """A model repository after two exports: version 1 with int8 TFLite, version 2 without."""
    base = tmp_path_factory.mktemp("models")
    first = export.export_version(model, **helpers.export_kwargs(base), tflite="int8")
    second = export.export_version(model, **helpers.export_kwargs(base))
    return base / "tiny", first, second


def _snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    return {
        str(path.relative_to(directory)): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mtime_ns,
        )
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _leftovers(model_dir: Path) -> list[str]:
    return sorted(child.name for child in model_dir.iterdir()) if model_dir.exists() else []


# --- version numbering -------------------------------------------------------------------------


def test_numeric_versions_reads_only_all_digit_directories(tmp_path):
    for name in ["1", "007", "12", "latest", ".export-3-abc", "3a", "", "٣"]:
        if name:
            (tmp_path / name).mkdir()
    (tmp_path / "40").write_text("a file, not a version")

    assert export.numeric_versions(tmp_path) == [1, 7, 12]
    assert export.next_version(tmp_path) == 13


def test_next_version_of_a_missing_or_empty_directory_is_1(tmp_path):
    assert export.numeric_versions(tmp_path / "missing") == []
    assert export.next_version(tmp_path / "missing") == 1
    assert export.next_version(tmp_path) == 1


# --- successful exports ------------------------------------------------------------------------


def test_two_exports_become_versions_1_and_2_with_nothing_else_left(repo):
    model_dir, first, second = repo

    assert (first.version, second.version) == (1, 2)
    assert (first.path, second.path) == (model_dir / "1", model_dir / "2")
    assert _leftovers(model_dir) == ["1", "2"]
    for result in (first, second):
        assert (result.path / "saved_model.pb").is_file()
        assert (result.path / "assets.extra" / "tf_serving_warmup_requests").is_file()


def test_model_card_holds_required_fields_and_parent_version(repo):
    _, first, second = repo
    card = model_card.read_model_card(second.path)

    assert card == second.model_card
    model_card.validate_model_card(card)
    assert (first.model_card["parent_version"], card["parent_version"]) == (None, 1)
    assert card["model_name"] == "tiny" and card["version"] == 2
    assert card["tensorflow_version"] == tf.__version__
    assert card["keras_version"] == keras.__version__
    assert datetime.fromisoformat(card["created"]).utcoffset().total_seconds() == 0
    assert card["dataset"]["fingerprint"] == "sha256:0123abcd"
    assert card["test_metrics"]["accuracy"] == pytest.approx(0.99)
    assert card["training"]["strategy"] == "OneDeviceStrategy"
    assert card["training"]["replicas"] == 1
    assert set(card["signatures"]) == {"serving_default", "predict_image_bytes"}
    assert set(card["preprocessing"]) == {"images", "image_bytes"}
    assert "tflite" not in card


def test_reloaded_version_reproduces_the_in_memory_model(repo, model):
    _, _, second = repo
    images, _ = helpers.held_out_data()
    loaded = tf.saved_model.load(str(second.path))

    outputs = loaded.signatures["serving_default"](images=tf.constant(images))
    expected = tf.nn.softmax(model(images, training=False)).numpy()

    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-5)
    assert outputs["classes"].dtype == tf.int64
    np.testing.assert_array_equal(outputs["classes"].numpy(), expected.argmax(axis=-1))


def test_warmup_file_holds_valid_requests_for_both_signatures(repo):
    _, _, second = repo
    records = warmup.read_warmup_records(second.path / warmup.WARMUP_FILE)

    assert 0 < len(records) <= warmup.MAX_WARMUP_RECORDS
    shapes = {}
    for record in records:
        request = record.predict_log.request
        assert request.model_spec.name == "tiny"
        ((key, proto),) = request.inputs.items()
        shapes.setdefault(request.model_spec.signature_name, []).append(
            (key, tf.make_ndarray(proto).shape)
        )
    assert shapes == {
        "serving_default": [("images", (1, 28, 28, 1)), ("images", (8, 28, 28, 1))],
        "predict_image_bytes": [("image_bytes", (1,))],
    }


def test_a_version_with_tflite_warms_up_only_what_the_tflite_model_serves(repo):
    """With --prefer_tflite_model TF Serving replays the warmup file on model.tflite, which has
    no predict_image_bytes: a record for it would fail the load."""
    _, first, _ = repo
    records = warmup.read_warmup_records(first.path / warmup.WARMUP_FILE)

    assert {r.predict_log.request.model_spec.signature_name for r in records} == {"serving_default"}
    assert len(records) == len(warmup.IMAGES_BATCH_SIZES)


def test_explicit_new_version_is_used_and_parent_is_the_highest_existing(model, tmp_path):
    (tmp_path / "tiny" / "3").mkdir(parents=True)

    result = export.export_version(model, **helpers.export_kwargs(tmp_path, version=10))

    assert result.path == tmp_path / "tiny" / "10"
    assert result.model_card["parent_version"] == 3
    assert export.numeric_versions(tmp_path / "tiny") == [3, 10]


# --- never overwrite ---------------------------------------------------------------------------


def test_exporting_an_existing_version_fails_and_leaves_it_byte_for_byte(repo, model):
    model_dir, first, _ = repo
    before = _snapshot(first.path)

    with pytest.raises(VersionExistsError, match=str(first.path)) as raised:
        export.export_version(model, **helpers.export_kwargs(model_dir.parent, version=1))

    assert raised.value.exit_code == 2
    assert _snapshot(first.path) == before
    assert _leftovers(model_dir) == ["1", "2"]


def test_zero_padded_directory_counts_as_the_same_version(model, tmp_path):
    (tmp_path / "tiny" / "007").mkdir(parents=True)

    with pytest.raises(VersionExistsError, match="007"):
        export.export_version(model, **helpers.export_kwargs(tmp_path, version=7))


def test_losing_the_race_at_rename_raises_and_keeps_the_winner(model, tmp_path, monkeypatch):
    winner = tmp_path / "tiny" / "1"

    def another_exporter_wins(temp_dir: Path) -> None:
        winner.mkdir()
        (winner / "saved_model.pb").write_text("the other exporter's version")

    monkeypatch.setattr(export, "_before_rename", another_exporter_wins)
    with pytest.raises(VersionExistsError, match="already exists"):
        export.export_version(model, **helpers.export_kwargs(tmp_path))

    assert _leftovers(tmp_path / "tiny") == ["1"]
    assert (winner / "saved_model.pb").read_text() == "the other exporter's version"


# --- failures leave nothing behind -------------------------------------------------------------


def test_reload_that_differs_from_the_model_fails_verification(model, tmp_path, monkeypatch):
    original = signatures.write_saved_model

    def write_other_weights(_model, path):
        # Same architecture, fresh weights: what a broken save would produce.
        original(keras.models.clone_model(_model), path)

    monkeypatch.setattr(signatures, "write_saved_model", write_other_weights)
    with pytest.raises(ExportError, match=r"max \|difference\|"):
        export.export_version(model, **helpers.export_kwargs(tmp_path))

    assert _leftovers(tmp_path / "tiny") == []


@pytest.mark.parametrize(
    ("module", "name", "error", "expected", "message"),
    [
        (
            tflite_export,
            "convert",
            ExportError("TFLite int8 conversion failed"),
            ExportError,
            "TFLite int8 conversion failed",
        ),
        (export, "write_keras_model", OSError("no space left"), ExportError, "no space left"),
        (model_card, "write_model_card", OSError("disk full"), ExportError, "disk full"),
        (export, "_before_rename", KeyboardInterrupt(), KeyboardInterrupt, ""),
    ],
    ids=["tflite", "keras", "model-card", "interrupt"],
)
def test_failure_in_any_step_removes_the_temp_dir(
    model, tmp_path, monkeypatch, module, name, error, expected, message
):
    """Each step's failure reaches the caller as what it is (an I/O error as ExportError
    naming it, an interrupt as itself), and no step leaves its temporary directory."""

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(module, name, fail)
    with pytest.raises(expected) as caught:
        export.export_version(model, **helpers.export_kwargs(tmp_path), tflite="int8")
    assert type(caught.value) is expected
    assert message in str(caught.value)

    assert _leftovers(tmp_path / "tiny") == []


def test_invalid_card_fields_fail_before_anything_is_written(model, tmp_path):
    fields = helpers.card_fields()
    del fields["dataset"]

    with pytest.raises(ExportError, match="dataset"):
        export.export_version(model, **helpers.export_kwargs(tmp_path, card_fields=fields))

    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((4, 14, 14, 1), np.float32), r"\[n>0, 28, 28, 1\]"),
        (np.full((4, 28, 28, 1), 255.0, np.float32), r"\[0, 1\]"),
    ],
)
def test_test_images_unlike_the_model_input_are_rejected(model, tmp_path, images, message):
    with pytest.raises(ExportError, match=message):
        export.export_version(
            model, **helpers.export_kwargs(tmp_path, test_images=images, test_labels=[0] * 4)
        )

    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("version", [0, -1, 1.5, True])
def test_version_must_be_a_positive_integer(model, tmp_path, version):
    with pytest.raises(ExportError, match="positive integer"):
        export.export_version(model, **helpers.export_kwargs(tmp_path, version=version))


def test_numpy_integer_version_is_accepted(model, tmp_path):
    result = export.export_version(model, **helpers.export_kwargs(tmp_path, version=np.int64(4)))

    assert type(result.version) is int and result.path.name == "4"


@pytest.mark.slow
def test_export_killed_before_rename_leaves_no_version(model, tmp_path):
    process, _ = helpers.start_paused_export(tmp_path, timeout=120)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    model_dir = tmp_path / "tiny"

    (leftover,) = _leftovers(model_dir)
    assert leftover.startswith(".export-1-")
    assert (model_dir / leftover / "saved_model.pb").is_file()  # it really was mid-export
    assert export.numeric_versions(model_dir) == []
    # The leftover does not block the next export, which removes it (its exporter is dead).
    assert export.export_version(model, **helpers.export_kwargs(tmp_path)).version == 1
    assert _leftovers(model_dir) == ["1"]


def test_an_export_removes_staging_left_by_dead_exporters(model, tmp_path):
    model_dir = tmp_path / "tiny"
    (model_dir / ".export-4-dead").mkdir(parents=True)
    (model_dir / ".export-4-dead" / "saved_model.pb").write_text("half an export")

    export.export_version(model, **helpers.export_kwargs(tmp_path))

    assert _leftovers(model_dir) == ["1"]


def test_an_export_leaves_staging_alone_while_another_exporter_holds_the_lock(model, tmp_path):
    import fcntl

    model_dir = tmp_path / "tiny"
    live = model_dir / ".export-4-live"
    live.mkdir(parents=True)
    # What a live exporter holds while it stages (another open file, so the locks conflict).
    fd = os.open(model_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        export.export_version(model, **helpers.export_kwargs(tmp_path))
    finally:
        os.close(fd)

    assert _leftovers(model_dir) == [live.name, "1"]


# --- TFLite and non-chief workers --------------------------------------------------------------


def test_tflite_int8_model_is_written_and_its_accuracy_recorded(repo, model):
    _, first, second = repo
    section = first.model_card["tflite"]
    path = first.path / section["path"]
    images, labels = helpers.held_out_data()

    # Where TF Serving's --prefer_tflite_model looks: the version directory itself.
    assert section["path"] == "model.tflite" and path.parent == first.path
    assert not (second.path / "model.tflite").exists()
    assert section["quantization"] == "int8"
    assert section["size_bytes"] == path.stat().st_size > 0
    assert tflite_export.int8_tensor_count(path) > 0
    float_classes = model(images, training=False).numpy().argmax(axis=-1)
    tflite_classes = tflite_export.predict_classes(path, images)
    assert section["test_accuracy"] == np.mean(tflite_classes == labels)
    assert section["saved_model_test_accuracy"] == pytest.approx(np.mean(float_classes == labels))
    assert section["class_agreement"] == np.mean(tflite_classes == float_classes) >= 0.9
    assert section["test_examples"] == len(labels)


@pytest.mark.parametrize("kind", ["float32", "float16"])
def test_float_tflite_kinds_match_the_saved_model(model, tmp_path, kind):
    result = export.export_version(model, **helpers.export_kwargs(tmp_path), tflite=kind)
    section = result.model_card["tflite"]
    path = result.path / "model.tflite"
    images, _ = helpers.held_out_data()

    assert section["quantization"] == kind
    assert tflite_export.int8_tensor_count(path) == 0
    assert (tflite_export.tensor_count(path, np.float16) > 0) == (kind == "float16")
    runner = tflite_export.interpreter(path).get_signature_runner("serving_default")
    outputs = runner(images=images)
    expected = tf.nn.softmax(model(images, training=False)).numpy()
    np.testing.assert_allclose(
        outputs["probabilities"], expected, atol=1e-5 if kind == "float32" else 2e-3
    )
    assert section["class_agreement"] == 1.0
    assert section["test_accuracy"] == section["saved_model_test_accuracy"]


def test_tflite_file_carries_the_saved_model_signature_for_tf_serving(repo):
    """tflite_session.cc reads SignatureDefs from the `signature_defs_metadata` metadata; the
    served version then has the SavedModel's keys, dtypes and shapes."""
    from convstack.serving.tflite import load_tflite_version

    _, first, _ = repo
    served = load_tflite_version("tiny", 1, first.path).signature_def_map().signature_def
    signature = served["serving_default"]
    assert set(served) == {"serving_default"}
    assert signature.method_name == "tensorflow/serving/predict"
    assert set(signature.inputs) == {"images"} and set(signature.outputs) == {
        "probabilities",
        "classes",
    }
    assert [d.size for d in signature.inputs["images"].tensor_shape.dim] == [-1, 28, 28, 1]
    assert signature.outputs["classes"].dtype == tf.int64.as_datatype_enum
    card_signature = first.model_card["signatures"]["serving_default"]
    assert card_signature["outputs"]["probabilities"]["shape"] == [None, 10]


def test_signature_defs_are_stored_as_flexbuffer_strings(repo):
    """signature_def_util.cc reads each value with AsString(), which gives "" for a blob."""
    from flatbuffers import flexbuffers
    from tensorflow.core.protobuf import meta_graph_pb2
    from tensorflow.lite.python import schema_py_generated as schema

    _, first, _ = repo
    model = schema.Model.GetRootAsModel((first.path / "model.tflite").read_bytes(), 0)
    (metadata,) = [
        model.Metadata(i)
        for i in range(model.MetadataLength())
        if model.Metadata(i).Name() == b"signature_defs_metadata"
    ]
    entries = flexbuffers.GetRoot(model.Buffers(metadata.Buffer()).DataAsNumpy().tobytes()).AsMap
    assert [key.AsKey for key in entries.Keys] == ["serving_default"]
    (value,) = entries.Values
    assert value.IsString and not value.IsBlob
    signature = meta_graph_pb2.SignatureDef.FromString(value.AsStringBytes)
    assert set(signature.outputs) == {"probabilities", "classes"}


def test_unknown_tflite_kind_is_refused_before_anything_is_written(model, tmp_path):
    with pytest.raises(ExportError, match="tflite must be None or one of float32, float16, int8"):
        export.export_version(model, **helpers.export_kwargs(tmp_path), tflite="int4")
    assert _leftovers(tmp_path / "tiny") == []


# --- the Keras-native copy ---------------------------------------------------------------------


def test_keras_file_reloads_to_the_saved_model_outputs(repo):
    """keras.models.load_model on assets.extra/model.keras gives serving_default's
    probabilities within the export tolerance (1e-5 for float32) and the same classes."""
    _, _, second = repo
    images, _ = helpers.held_out_data()
    reloaded = keras.models.load_model(second.path / "assets.extra" / "model.keras")
    served = tf.saved_model.load(str(second.path)).signatures["serving_default"](
        images=tf.constant(images)
    )

    probabilities = tf.nn.softmax(reloaded(images, training=False)).numpy()
    np.testing.assert_allclose(probabilities, served["probabilities"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(-1), served["classes"].numpy())
    # TF Serving and our server load the SavedModel and ignore assets.extra.
    assert (second.path / export.KERAS_FILE).parent.name == "assets.extra"


def test_keras_file_that_differs_from_the_saved_model_fails_the_export(
    model, tmp_path, monkeypatch
):
    def write_other_weights(model_, directory):
        other = keras.models.clone_model(model_)
        other.set_weights([w + 0.5 for w in model_.get_weights()])
        return original(other, directory)

    original = export.write_keras_model
    monkeypatch.setattr(export, "write_keras_model", write_other_weights)
    with pytest.raises(ExportError, match=r"model\.keras reloaded vs SavedModel serving_default"):
        export.export_version(model, **helpers.export_kwargs(tmp_path))
    assert _leftovers(tmp_path / "tiny") == []


def test_non_chief_export_does_the_work_but_leaves_nothing(repo, model):
    model_dir, first, _ = repo
    before = _snapshot(first.path)

    result = export.export_version(
        model, **helpers.export_kwargs(model_dir.parent, version=1), is_chief=False
    )

    assert result.version == 1 and result.model_card["version"] == 1
    assert not result.path.exists()
    assert model_dir not in result.path.parents
    assert _leftovers(model_dir) == ["1", "2"]
    assert _snapshot(first.path) == before


@pytest.fixture
def mixed_bfloat16():
    """The global policy the trainer leaves set during export with --mixed-precision on CPU."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy(previous)


def test_mixed_precision_model_exports_with_looser_tolerance_and_float32_tflite(
    tmp_path, mixed_bfloat16
):
    model = helpers.build_tiny_model()
    assert export._tolerance(model) == export.MIXED_PRECISION_ATOL

    result = export.export_version(model, **helpers.export_kwargs(tmp_path), tflite="int8")

    assert result.version == 1
    # The int8 converter cannot take bfloat16 ops; export converts a float32 copy instead.
    assert tflite_export.int8_tensor_count(result.path / tflite_export.TFLITE_FILE) > 0
    assert 0.0 <= result.model_card["tflite"]["test_accuracy"] <= 1.0
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"


def test_float32_copy_has_the_same_weights_and_float32_layers(mixed_bfloat16):
    model = helpers.build_tiny_model()

    copy = tflite_export.float32_copy(model)

    assert signatures.computes_in_float32(copy)
    for original, copied in zip(model.get_weights(), copy.get_weights(), strict=True):
        np.testing.assert_array_equal(original, copied)


def test_publish_never_replaces_an_empty_version_directory(tmp_path):
    from convstack.trainer.export import _rename_no_replace

    source = tmp_path / ".export-1-abc"
    source.mkdir()
    (source / "saved_model.pb").write_bytes(b"x")
    target = tmp_path / "1"
    target.mkdir()  # another exporter just created it, still empty
    with pytest.raises(OSError) as caught:
        _rename_no_replace(source, target)
    assert caught.value.errno == errno.EEXIST
    assert list(target.iterdir()) == [] and (source / "saved_model.pb").exists()
