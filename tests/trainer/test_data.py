"""Loading every dataset source: shapes, values, splits, fingerprints and bad-data errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from convstack.trainer.data import SPLITS, load_dataset
from convstack.trainer.errors import DataError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def assert_data_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    assert excinfo.value.exit_code == 2
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def all_labels(dataset) -> np.ndarray:
    return np.concatenate([dataset.arrays(name)[1] for name in SPLITS])


# --- digits ---------------------------------------------------------------------------------


def test_digits_has_documented_shape_classes_and_split_sizes(digits):
    info = digits.info
    assert (info.source, info.image_shape, info.num_classes) == ("digits", (28, 28, 1), 10)
    assert info.class_names == tuple("0123456789")
    assert info.split_sizes == {"train": 1258, "validation": 180, "test": 359}
    assert digits.in_memory and digits.files("train") == []
    for name in SPLITS:
        images, labels = digits.arrays(name)
        assert images.dtype == np.float32 and labels.dtype == np.int64
        assert images.shape == (info.split_sizes[name], 28, 28, 1)
        assert images.min() >= 0.0 and images.max() <= 1.0


def test_digits_splits_partition_the_images_stratified(digits):
    target = load_digits().target
    assert np.array_equal(np.bincount(all_labels(digits)), np.bincount(target))
    test_counts = np.bincount(digits.arrays("test")[1], minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * np.bincount(target)) <= 1)


def test_digits_images_are_scaled_by_16_and_resized_bilinearly(digits):
    raw = load_digits().images[0].astype(np.float32)[..., None] / 16.0
    expected = tf.image.resize(raw, (28, 28)).numpy()
    # Indices stay sorted within each split, so digit 0 leads whichever split holds it.
    firsts = [digits.arrays(name, limit=1)[0][0] for name in SPLITS]
    assert any(np.allclose(first, expected, atol=1e-6) for first in firsts)


def test_digits_split_and_fingerprint_are_deterministic_per_seed(digits):
    again = load_dataset("digits")
    other = load_dataset("digits", seed=7)
    assert again.info.fingerprint == digits.info.fingerprint
    assert len(digits.info.fingerprint) == 64
    for name in SPLITS:
        assert np.array_equal(again.arrays(name)[0], digits.arrays(name)[0])
    assert other.info.fingerprint != digits.info.fingerprint
    assert not np.array_equal(other.arrays("test")[1], digits.arrays("test")[1])


def test_split_yields_the_arrays_in_order_unbatched(digits):
    images, labels = digits.arrays("validation", limit=5)
    spec = digits.split("validation").element_spec
    assert spec[0].shape == (28, 28, 1) and spec[0].dtype == tf.float32
    assert spec[1].shape == () and spec[1].dtype == tf.int64
    got = list(digits.split("validation").take(5).as_numpy_iterator())
    assert np.array_equal(np.stack([g[0] for g in got]), images)
    assert [g[1] for g in got] == list(labels)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        digits.split("valid")


def test_info_to_json_is_plain_json(digits):
    data = json.loads(json.dumps(digits.info.to_json()))
    assert data["image_shape"] == [28, 28, 1]
    assert data["split_sizes"]["test"] == 359
    assert data["fingerprint"] == digits.info.fingerprint
    assert data["class_names"][3] == "3"


def test_unknown_uri_is_a_data_error():
    with pytest.raises(DataError) as excinfo:
        load_dataset("csv:/tmp/x.csv")
    assert_data_error(excinfo, "csv:/tmp/x.csv", "digits, npz:PATH")


# --- npz ------------------------------------------------------------------------------------


def test_npz_scales_uint8_and_carves_validation_from_train(npz_path, helpers):
    dataset = load_dataset(f"npz:{npz_path}")
    info = dataset.info
    assert (info.source, info.image_shape, info.num_classes) == ("npz", (8, 8, 1), 4)
    assert info.split_sizes == {"train": 36, "validation": 4, "test": 12}
    train, validation = dataset.arrays("train"), dataset.arrays("validation")
    assert sorted(helpers.example_ids(train[0]) + helpers.example_ids(validation[0])) == list(
        range(40)
    )
    test_images, test_labels = dataset.arrays("test")
    assert helpers.example_ids(test_images) == list(range(40, 52))
    assert np.array_equal(test_labels, np.arange(40, 52) % 4)
    assert np.allclose(test_images[0], 200 / 255)
    ids = helpers.example_ids(train[0])
    assert np.array_equal(train[1], np.array(ids) % 4)


def test_npz_keeps_channels_and_takes_unit_floats_as_they_are(make_npz):
    rng = np.random.default_rng(0)
    x_train = rng.random((20, 5, 6, 3), dtype=np.float32)
    x_test = rng.random((4, 5, 6, 3), dtype=np.float32)
    path = make_npz(x_train=x_train, y_train=np.arange(20) % 2, x_test=x_test, y_test=[0, 1, 0, 1])
    dataset = load_dataset(f"npz:{path}", validation_fraction=0.25)
    assert dataset.info.image_shape == (5, 6, 3)
    assert dataset.info.split_sizes == {"train": 15, "validation": 5, "test": 4}
    assert np.array_equal(dataset.arrays("test")[0], x_test)


def test_npz_fingerprint_is_stable_and_follows_content_and_seed(make_npz):
    path = make_npz()
    first = load_dataset(f"npz:{path}").info.fingerprint
    assert load_dataset(f"npz:{path}").info.fingerprint == first
    assert load_dataset(f"npz:{path}", seed=1).info.fingerprint != first
    images = np.stack([np.full((8, 8), 5 * i, np.uint8) for i in range(40)])
    images[3, 0, 0] += 1
    assert load_dataset(f"npz:{make_npz(x_train=images)}").info.fingerprint != first


NPZ_ERRORS = {
    "missing keys": ({"y_test": None}, ["missing keys y_test"]),
    "length mismatch": (
        {"y_train": np.arange(39) % 4},
        ["x_train has 40 images but y_train has 39 labels"],
    ),
    "float out of range": (
        {"x_train": np.full((40, 8, 8), 2.0, np.float32)},
        ["x_train", "outside [0, 1]"],
    ),
    "integer out of range": (
        {"x_train": np.full((40, 8, 8), 300, np.int16)},
        ["x_train", "outside 0..255"],
    ),
    "negative label": ({"y_test": np.array([-1] + [0] * 11)}, ["y_test", "label -1 is negative"]),
    "fractional label": (
        {"y_train": np.full(40, 0.5)},
        ["y_train", "label 0.5 is not an integer"],
    ),
    "wrong rank": ({"x_train": np.zeros((40, 64), np.uint8)}, ["x_train has shape (40, 64)"]),
    "inconsistent shapes": (
        {"x_test": np.zeros((12, 9, 9), np.uint8)},
        ["inconsistent image shapes", "x_train is 8x8x1", "x_test is 9x9x1"],
    ),
}


@pytest.mark.parametrize("case", NPZ_ERRORS)
def test_bad_npz_is_a_data_error_naming_the_file(make_npz, case):
    overrides, fragments = NPZ_ERRORS[case]
    path = make_npz(**overrides)
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"npz:{path}")
    assert_data_error(excinfo, str(path), *fragments)


def test_npz_with_empty_test_split_is_a_data_error(make_npz):
    path = make_npz(x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, np.uint8))
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"npz:{path}")
    assert_data_error(excinfo, f"npz:{path}: the test split is empty")


def test_missing_or_corrupt_npz_is_a_data_error(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    assert_data_error(excinfo, f"{tmp_path / 'nope.npz'}: no such file")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"npz:{corrupt}")
    assert_data_error(excinfo, str(corrupt), "not a readable .npz file")


# --- image folders --------------------------------------------------------------------------


def test_image_folder_reads_png_and_jpeg_with_folder_names_as_classes(image_folder):
    dataset = load_dataset(f"images:{image_folder}")
    info = dataset.info
    assert (info.source, info.image_shape) == ("images", (8, 8, 1))
    assert info.class_names == ("cat", "dog", "emu") and info.num_classes == 3
    assert info.split_sizes == {"train": 12, "validation": 2, "test": 4}
    assert np.array_equal(np.bincount(all_labels(dataset)), [6, 6, 6])
    images = np.concatenate([dataset.arrays(name)[0] for name in SPLITS])
    # PNG is lossless: dog/00.png (label 1, index 0) comes back exactly; rows step by 20.
    expected = ((np.arange(8) * 20 + 60) % 256 / 255.0).astype(np.float32)
    assert any(np.array_equal(image[:, 0, 0], expected) for image in images)
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1


def test_rgb_image_folder_has_three_channels(make_image_folder):
    dataset = load_dataset(f"images:{make_image_folder(channels=3)}")
    assert dataset.info.image_shape == (8, 8, 3)


def test_image_folder_fingerprint_follows_file_contents(image_folder, helpers):
    first = load_dataset(f"images:{image_folder}").info.fingerprint
    assert load_dataset(f"images:{image_folder}").info.fingerprint == first
    (image_folder / "cat" / "00.png").write_bytes(helpers.encode(helpers.flat_image(9)))
    assert load_dataset(f"images:{image_folder}").info.fingerprint != first


def test_corrupt_image_is_a_data_error_naming_the_file(image_folder):
    bad = image_folder / "dog" / "07.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"images:{image_folder}")
    assert_data_error(excinfo, str(bad), "cannot decode image")


def test_mixed_gray_and_rgb_images_name_both_files(image_folder, helpers):
    rgb = image_folder / "emu" / "09.png"
    rgb.write_bytes(helpers.encode(helpers.flat_image(1, channels=3)))
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"images:{image_folder}")
    first = image_folder / "cat" / "00.png"
    assert_data_error(excinfo, "inconsistent image shapes", f"{first} is 8x8x1", f"{rgb} is 8x8x3")


def test_images_of_different_sizes_name_both_files(image_folder, helpers):
    big = image_folder / "cat" / "10.png"
    big.write_bytes(helpers.encode(np.zeros((9, 8, 1), np.uint8)))
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"images:{image_folder}")
    assert_data_error(excinfo, "8x8x1", f"{big} is 9x8x1")


def test_image_folder_layout_errors(tmp_path, make_image_folder):
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"images:{tmp_path / 'absent'}")
    assert_data_error(excinfo, f"{tmp_path / 'absent'}: no such directory")

    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"images:{tmp_path / 'flat'}")
    assert_data_error(excinfo, str(tmp_path / "flat"), "no class sub-folders")

    root = make_image_folder()
    (root / "fox").mkdir()
    (root / "fox" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"images:{root}")
    assert_data_error(excinfo, str(root / "fox"), "no .png, .jpg or .jpeg files")


def test_too_few_images_for_a_split_is_a_data_error(make_image_folder):
    root = make_image_folder(per_class=1)
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"images:{root}")
    assert_data_error(excinfo, f"images:{root}: the validation split is empty")


# --- TFRecord shards ------------------------------------------------------------------------


def test_tfrecord_shards_are_scanned_and_read_lazily(tfrecord_dir, helpers):
    dataset = load_dataset(f"tfrecord:{tfrecord_dir}/*.tfrecord")
    info = dataset.info
    assert (info.source, info.image_shape, info.num_classes) == ("tfrecord", (8, 8, 1), 3)
    assert info.class_names == ("0", "1", "2")
    assert info.split_sizes == {"train": 20, "validation": 4, "test": 6}
    assert not dataset.in_memory
    assert [p.rsplit("/", 1)[1] for p in dataset.files("train")] == [
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]
    images, labels = dataset.arrays("train")
    assert images.dtype == np.float32 and labels.dtype == np.int64
    assert helpers.example_ids(images) == list(range(20))
    assert np.array_equal(labels, np.arange(20) % 3)
    assert np.allclose(images[7], 35 / 255)
    assert helpers.example_ids(dataset.arrays("test", limit=2)[0]) == [24, 25]


def test_tfrecord_directory_uri_means_its_tfrecord_files(tfrecord_dir):
    dataset = load_dataset(f"tfrecord:{tfrecord_dir}")
    assert dataset.info.split_sizes == {"train": 20, "validation": 4, "test": 6}


def test_tfrecord_jpeg_records_decode(tfrecord_dir, helpers):
    (tfrecord_dir / "test-00000-of-00001.tfrecord").unlink()
    records = [helpers.example(helpers.encode(helpers.flat_image(i), "JPEG"), 0) for i in (3, 40)]
    helpers.write_records(tfrecord_dir / "test-00000-of-00001.tfrecord", records)
    images, _ = load_dataset(f"tfrecord:{tfrecord_dir}/*.tfrecord").arrays("test")
    assert np.allclose(images[0], 15 / 255, atol=2 / 255)
    assert np.allclose(images[1], 200 / 255, atol=2 / 255)


def test_tfrecord_takes_classes_from_dataset_json(tfrecord_dir):
    metadata = {"num_classes": 5, "class_names": list("abcde"), "image_shape": [8, 8, 1]}
    (tfrecord_dir / "dataset.json").write_text(json.dumps(metadata))
    info = load_dataset(f"tfrecord:{tfrecord_dir}/*").info
    assert info.num_classes == 5 and info.class_names == tuple("abcde")


def test_tfrecord_label_beyond_dataset_json_classes_is_a_data_error(tfrecord_dir):
    metadata = {"num_classes": 2, "class_names": ["a", "b"], "image_shape": [8, 8, 1]}
    (tfrecord_dir / "dataset.json").write_text(json.dumps(metadata))
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"tfrecord:{tfrecord_dir}/*.tfrecord")
    shard = tfrecord_dir / "train-00000-of-00002.tfrecord"
    assert_data_error(excinfo, f"{shard} record 2: label 2 is outside 0..1", "dataset.json")


def test_tfrecord_fingerprint_follows_file_contents(tfrecord_dir, helpers):
    uri = f"tfrecord:{tfrecord_dir}/*.tfrecord"
    first = load_dataset(uri).info.fingerprint
    assert load_dataset(uri).info.fingerprint == first
    records = [helpers.example(helpers.encode(helpers.flat_image(i)), 1) for i in range(6)]
    helpers.write_records(tfrecord_dir / "test-00000-of-00001.tfrecord", records)
    assert load_dataset(uri).info.fingerprint != first


def test_tfrecord_glob_errors(tmp_path, tfrecord_dir):
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"tfrecord:{tfrecord_dir}/*.tfrec")
    assert_data_error(excinfo, f"{tfrecord_dir}/*.tfrec: no files match")
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"tfrecord:{tmp_path}/absent/*.tfrecord")
    assert_data_error(
        excinfo, f"{tmp_path}/absent/*.tfrecord: no files match ({tmp_path}/absent: no such"
    )
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"tfrecord:{tmp_path}/one.tfrecord")
    assert_data_error(excinfo, f"{tmp_path}/one.tfrecord: no such file")


def test_tfrecord_file_without_split_prefix_is_a_data_error(tfrecord_dir):
    stray = tfrecord_dir / "eval-00000-of-00001.tfrecord"
    stray.write_bytes(b"")
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"tfrecord:{tfrecord_dir}/*.tfrecord")
    assert_data_error(excinfo, str(stray), "train-, validation- or test-")


def test_tfrecord_missing_split_is_a_data_error(tfrecord_dir):
    uri = f"tfrecord:{tfrecord_dir}/t*.tfrecord"
    with pytest.raises(DataError) as excinfo:
        load_dataset(uri)
    assert_data_error(excinfo, f"{uri}: the validation split is empty")


def test_corrupt_tfrecord_file_is_a_data_error(tfrecord_dir):
    shard = tfrecord_dir / "test-00000-of-00001.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"tfrecord:{tfrecord_dir}/*.tfrecord")
    assert_data_error(excinfo, str(shard), "not a readable TFRecord file")


def _replace_test_shard(tfrecord_dir, helpers, records):
    shard = tfrecord_dir / "test-00000-of-00001.tfrecord"
    helpers.write_records(shard, records)
    return shard


def test_tfrecord_bad_records_are_data_errors_naming_file_and_record(tfrecord_dir, helpers):
    good = helpers.example(helpers.encode(helpers.flat_image(1)), 0)
    cases = [
        (helpers.example(b"not an image", 0), "cannot decode image"),
        (helpers.example(helpers.encode(helpers.flat_image(1)), -3), "label -3 is negative"),
        (
            tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "image": tf.train.Feature(
                            bytes_list=tf.train.BytesList(
                                value=[helpers.encode(helpers.flat_image(1))]
                            )
                        ),
                        "label": tf.train.Feature(float_list=tf.train.FloatList(value=[1.5])),
                    }
                )
            ).SerializeToString(),
            "'label' feature holding one int64 (got float_list)",
        ),
        (b"\xff\xff not a proto", "not a tf.train.Example"),
    ]
    for record, fragment in cases:
        shard = _replace_test_shard(tfrecord_dir, helpers, [good, record])
        with pytest.raises(DataError) as excinfo:
            load_dataset(f"tfrecord:{tfrecord_dir}/*.tfrecord")
        assert_data_error(excinfo, f"{shard} record 1", fragment)


def test_tfrecord_inconsistent_shapes_name_both_files(tfrecord_dir, helpers):
    records = [helpers.example(helpers.encode(np.zeros((6, 8, 1), np.uint8)), 0)]
    shard = _replace_test_shard(tfrecord_dir, helpers, records)
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"tfrecord:{tfrecord_dir}/*.tfrecord")
    first = tfrecord_dir / "train-00000-of-00002.tfrecord"
    assert_data_error(excinfo, f"{first} record 0 is 8x8x1", f"{shard} record 0 is 6x8x1")
