"""Training and evaluation pipelines: batch shapes, epoch order, resuming, auto-sharding."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.data.experimental.ops.distribute import _AutoShardDataset

from convstack.trainer import pipeline
from convstack.trainer.data import load_dataset
from convstack.trainer.errors import DataError

AutoShardPolicy = tf.data.experimental.AutoShardPolicy


@pytest.fixture
def npz_dataset(npz_path):
    return load_dataset(f"npz:{npz_path}")  # train: 36 examples of ids 0..39


@pytest.fixture
def tfrecord_dataset(tfrecord_dir):
    return load_dataset(f"tfrecord:{tfrecord_dir}/*.tfrecord")  # train: ids 0..19 in 2 files


def batch_ids(batches: tf.data.Dataset, helpers) -> list[list[int]]:
    return [helpers.example_ids(images) for images, _ in batches.as_numpy_iterator()]


def train_ids(dataset, helpers, **kwargs) -> list[list[int]]:
    kwargs = {"global_batch_size": 8, "seed": 42, "epoch": 0, **kwargs}
    return batch_ids(pipeline.training_batches(dataset, **kwargs), helpers)


def test_steps_per_epoch_drops_the_remainder(npz_dataset):
    assert pipeline.steps_per_epoch(npz_dataset, 8) == 4
    assert pipeline.steps_per_epoch(npz_dataset, 36) == 1


def test_batch_larger_than_training_split_is_a_data_error(npz_dataset, npz_path):
    with pytest.raises(DataError) as excinfo:
        pipeline.steps_per_epoch(npz_dataset, 37)
    assert str(excinfo.value) == (
        f"npz:{npz_path}: the training split has 36 examples, fewer than the global batch size 37"
    )
    with pytest.raises(DataError):
        pipeline.training_batches(npz_dataset, global_batch_size=37, seed=0, epoch=0)


def test_training_batches_are_full_global_batches_of_distinct_train_examples(npz_dataset, helpers):
    batches = pipeline.training_batches(npz_dataset, global_batch_size=8, seed=1, epoch=0)
    images_spec, labels_spec = batches.element_spec
    assert images_spec.shape == (8, 8, 8, 1) and images_spec.dtype == tf.float32
    assert labels_spec.shape == (8,) and labels_spec.dtype == tf.int64
    got = list(batches.as_numpy_iterator())
    assert len(got) == 4  # 36 examples: 4 batches of 8, the 4 left over are dropped
    ids = [i for images, _ in got for i in helpers.example_ids(images)]
    assert len(set(ids)) == 32
    assert set(ids) <= set(helpers.example_ids(npz_dataset.arrays("train")[0]))
    for images, labels in got:
        assert np.array_equal(labels, np.array(helpers.example_ids(images)) % 4)


def test_same_seed_and_epoch_give_the_same_batches_and_others_differ(npz_dataset, helpers):
    first = train_ids(npz_dataset, helpers, epoch=3)
    assert train_ids(npz_dataset, helpers, epoch=3) == first
    assert train_ids(npz_dataset, helpers, epoch=4) != first
    assert train_ids(npz_dataset, helpers, epoch=3, seed=43) != first
    assert first != sorted(first)


def test_skip_batches_resumes_mid_epoch(npz_dataset, helpers):
    full = train_ids(npz_dataset, helpers, epoch=2)
    assert train_ids(npz_dataset, helpers, epoch=2, skip_batches=3) == full[3:]
    assert train_ids(npz_dataset, helpers, epoch=2, skip_batches=4) == []
    with pytest.raises(ValueError, match="skip_batches"):
        train_ids(npz_dataset, helpers, skip_batches=5)


def test_in_memory_sources_shard_by_data(npz_dataset):
    batches = pipeline.training_batches(npz_dataset, global_batch_size=8, seed=0, epoch=0)
    assert batches.options().experimental_distribute.auto_shard_policy == AutoShardPolicy.DATA
    assert batches.options().deterministic


def test_evaluation_batches_keep_order_and_remainder(npz_dataset, tfrecord_dataset):
    batches = pipeline.evaluation_batches(npz_dataset, "test", global_batch_size=5)
    got = list(batches.as_numpy_iterator())
    assert [len(labels) for _, labels in got] == [5, 5, 2]
    images, labels = npz_dataset.arrays("test")
    assert np.array_equal(np.concatenate([g[0] for g in got]), images)
    assert np.array_equal(np.concatenate([g[1] for g in got]), labels)
    for dataset in (npz_dataset, tfrecord_dataset):
        batches = pipeline.evaluation_batches(dataset, "validation", global_batch_size=3)
        assert batches.options().experimental_distribute.auto_shard_policy == AutoShardPolicy.DATA


def test_tfrecord_training_shards_by_file_and_is_deterministic(tfrecord_dataset, helpers):
    batches = pipeline.training_batches(
        tfrecord_dataset, global_batch_size=4, seed=5, epoch=0, num_workers=2
    )
    assert batches.options().experimental_distribute.auto_shard_policy == AutoShardPolicy.FILE
    first = batch_ids(batches, helpers)
    assert [len(ids) for ids in first] == [4] * 5
    assert sorted(i for ids in first for i in ids) == list(range(20))
    again = train_ids(tfrecord_dataset, helpers, global_batch_size=4, seed=5, epoch=0)
    assert again == first
    assert train_ids(tfrecord_dataset, helpers, global_batch_size=4, seed=5, epoch=1) != first


def test_file_sharding_gives_each_worker_whole_files(tfrecord_dataset, helpers):
    batches = pipeline.training_batches(
        tfrecord_dataset, global_batch_size=2, seed=5, epoch=0, num_workers=2
    )
    per_worker = [
        {i for ids in batch_ids(_AutoShardDataset(batches, 2, index), helpers) for i in ids}
        for index in range(2)
    ]
    files = [set(range(0, 10)), set(range(10, 20))]
    assert sorted(per_worker, key=min) == files


def test_fewer_train_files_than_workers_is_a_data_error(tfrecord_dataset):
    with pytest.raises(DataError) as excinfo:
        pipeline.training_batches(
            tfrecord_dataset, global_batch_size=4, seed=0, epoch=0, num_workers=3
        )
    message = str(excinfo.value)
    assert "the train split has 2 files but training runs on 3 workers" in message
    assert message.startswith(tfrecord_dataset.info.uri)
