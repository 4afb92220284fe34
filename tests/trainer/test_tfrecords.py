"""Converting datasets to TFRecord shards and back, directly and through `convstack data`."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from convstack.trainer.data import SPLITS, load_dataset
from convstack.trainer.data_cli import data_main
from convstack.trainer.errors import DataError
from convstack.trainer.tfrecords import write_tfrecords


def assert_same_examples(source, converted) -> None:
    assert converted.info.split_sizes == source.info.split_sizes
    assert converted.info.image_shape == source.info.image_shape
    assert converted.info.class_names == source.info.class_names
    for name in SPLITS:
        images, labels = source.arrays(name)
        got_images, got_labels = converted.arrays(name)
        assert np.array_equal(got_labels, labels)
        assert np.max(np.abs(got_images - images)) <= 1 / 255


def directory_digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_npz_round_trip_keeps_splits_labels_and_images(npz_path, tmp_path):
    source = load_dataset(f"npz:{npz_path}")
    out = tmp_path / "out"
    written = write_tfrecords(source, out, shards=3)
    assert [p.name for p in written["train"]] == [
        f"train-0000{i}-of-00003.tfrecord" for i in range(3)
    ]
    assert [len(written[name]) for name in SPLITS] == [3, 3, 3]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for name in SPLITS for p in written[name]] + ["dataset.json"]
    )
    converted = load_dataset(f"tfrecord:{out}/*.tfrecord")
    assert_same_examples(source, converted)
    # Pixels were uint8 to begin with, so PNG gives them back exactly.
    assert np.array_equal(converted.arrays("test")[0], source.arrays("test")[0])
    assert converted.files("validation") == [str(p) for p in written["validation"]]


def test_dataset_json_describes_the_conversion(npz_path, tmp_path):
    source = load_dataset(f"npz:{npz_path}")
    write_tfrecords(source, tmp_path / "out")
    metadata = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert metadata["source"] == f"npz:{npz_path}"
    assert metadata["source_fingerprint"] == source.info.fingerprint
    assert metadata["num_classes"] == 4 and metadata["class_names"] == ["0", "1", "2", "3"]
    assert metadata["image_shape"] == [8, 8, 1]
    assert metadata["split_sizes"] == {"train": 36, "validation": 4, "test": 12}


def test_rgb_image_folder_round_trip_keeps_class_names(make_image_folder, tmp_path):
    source = load_dataset(f"images:{make_image_folder(channels=3)}")
    written = write_tfrecords(source, tmp_path / "out", shards=8)
    # Small splits get one file per example rather than empty files.
    assert [len(written[name]) for name in SPLITS] == [8, 2, 4]
    converted = load_dataset(f"tfrecord:{tmp_path / 'out'}/*.tfrecord")
    assert converted.info.class_names == ("cat", "dog", "emu")
    assert_same_examples(source, converted)


def test_existing_shards_are_never_overwritten(npz_path, tmp_path):
    source = load_dataset(f"npz:{npz_path}")
    out = tmp_path / "out"
    write_tfrecords(source, out, shards=2)
    before = directory_digest(out)
    other = load_dataset(f"npz:{npz_path}", seed=9)
    with pytest.raises(DataError) as excinfo:
        write_tfrecords(other, out, shards=2)
    assert str(out) in str(excinfo.value) and "refusing to overwrite" in str(excinfo.value)
    assert directory_digest(out) == before  # no temporary files left behind either


def test_four_channel_images_cannot_be_written_as_png_records(make_npz, tmp_path):
    x = np.zeros((10, 4, 4, 4), np.uint8)
    path = make_npz(x_train=x, y_train=np.arange(10) % 2, x_test=x[:2], y_test=[0, 1])
    with pytest.raises(DataError, match="4 channels"):
        write_tfrecords(load_dataset(f"npz:{path}"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_data_main_converts_digits(tmp_path, capsys):
    out = tmp_path / "digits"
    argv = ["to-tfrecord", "--data", "digits", "--out", str(out), "--shards", "2", "--seed", "3"]
    assert data_main(argv) == 0
    summary = capsys.readouterr().out
    assert "train" in summary and "1258 examples in 2 files" in summary
    assert "359 examples in 2 files" in summary
    assert_same_examples(load_dataset("digits", seed=3), load_dataset(f"tfrecord:{out}"))


def test_data_main_reports_data_errors_with_exit_code_2(tmp_path, npz_path, capsys):
    missing = tmp_path / "missing.npz"
    argv = ["to-tfrecord", "--data", f"npz:{missing}", "--out", str(tmp_path / "out")]
    assert data_main(argv) == 2
    assert capsys.readouterr().err == f"convstack data: error: {missing}: no such file\n"

    argv = ["to-tfrecord", "--data", f"npz:{npz_path}", "--out", str(tmp_path / "out")]
    assert data_main(argv) == 0
    capsys.readouterr()
    assert data_main(argv) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["to-tfrecord", "--out", "x"],
        ["to-tfrecord", "--data", "digits", "--out", "x", "--shards", "0"],
        ["to-tfrecord", "--data", "digits", "--out", "x", "--test-fraction", "1.5"],
        [
            "to-tfrecord",
            "--data",
            "digits",
            "--out",
            "x",
            "--validation-fraction",
            "0.6",
            "--test-fraction",
            "0.5",
        ],
    ],
)
def test_data_main_rejects_bad_flags_with_exit_code_2(flags, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data_main(flags) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_data_main_help_exits_0(capsys):
    assert data_main(["to-tfrecord", "--help"]) == 0
    assert "--validation-fraction" in capsys.readouterr().out
