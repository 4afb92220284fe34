"""tf.data input pipelines for the distributed training loop.

Batches are global batches: the loop hands them to `strategy.experimental_distribute_dataset`,
which splits each across the replicas. In-memory sources are sharded across workers by DATA
(every worker reads everything and keeps its share of each batch); TFRecord training data is
sharded by FILE, so each worker reads only its own shards.
"""

from __future__ import annotations

import hashlib

import tensorflow as tf

from convstack.trainer import tfrecords
from convstack.trainer.data import Dataset
from convstack.trainer.errors import DataError

# Enough to mix examples across the interleaved shards without holding a large dataset in RAM.
TFRECORD_SHUFFLE_BUFFER = 10_000
# Shards read at once; more gives better mixing at the cost of open files and memory.
TFRECORD_CYCLE_LENGTH = 4


def steps_per_epoch(dataset: Dataset, global_batch_size: int) -> int:
    """Full global batches in one pass over the training split (the remainder is dropped)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be at least 1, got {global_batch_size}")
    size = dataset.info.split_sizes["train"]
    if size < global_batch_size:
        raise DataError(
            f"{dataset.info.uri}: the training split has {size} examples, fewer than the "
            f"global batch size {global_batch_size}"
        )
    return size // global_batch_size


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: a pure function of (seed, epoch), so a resumed run
    replays exactly the batches it would have seen."""
    digest = hashlib.sha256(f"{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # tf seeds are int64


def training_batches(
    dataset: Dataset,
    *,
    global_batch_size: int,
    seed: int,
    epoch: int,
    skip_batches: int = 0,
    num_workers: int = 1,
) -> tf.data.Dataset:
    """One epoch of shuffled global batches of the training split, skipping the first
    `skip_batches` (to resume mid-epoch). The same (seed, epoch) gives the same batches."""
    steps = steps_per_epoch(dataset, global_batch_size)
    if not 0 <= skip_batches <= steps:
        raise ValueError(f"skip_batches must be in 0..{steps}, got {skip_batches}")
    shuffle_seed = epoch_seed(seed, epoch)
    size = dataset.info.split_sizes["train"]
    if dataset.in_memory:
        # The data is in memory anyway, so shuffle all of it: an exact permutation per epoch.
        examples, buffer = dataset.split("train").cache(), size
        policy = tf.data.experimental.AutoShardPolicy.DATA
    else:
        examples = _interleaved_shards(dataset, shuffle_seed, num_workers)
        buffer = min(size, TFRECORD_SHUFFLE_BUFFER)
        policy = tf.data.experimental.AutoShardPolicy.FILE
    batches = (
        examples.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        .batch(global_batch_size, drop_remainder=True)
        .skip(skip_batches)
        .prefetch(tf.data.AUTOTUNE)
    )
    return batches.with_options(_options(policy))


def evaluation_batches(dataset: Dataset, split: str, *, global_batch_size: int) -> tf.data.Dataset:
    """Every example of `split` in order, in global batches; the last batch may be short."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be at least 1, got {global_batch_size}")
    examples = dataset.split(split)
    if dataset.in_memory:
        examples = examples.cache()
    batches = examples.batch(global_batch_size).prefetch(tf.data.AUTOTUNE)
    return batches.with_options(_options(tf.data.experimental.AutoShardPolicy.DATA))


def _interleaved_shards(dataset: Dataset, seed: int, num_workers: int) -> tf.data.Dataset:
    """Training examples read from the shard list, which FILE auto-sharding can split."""
    files = dataset.files("train")
    if len(files) < num_workers:
        raise DataError(
            f"{dataset.info.uri}: the train split has {len(files)} files but training runs on "
            f"{num_workers} workers; FILE sharding gives each worker whole files, so write at "
            f"least {num_workers} train shards (convstack data to-tfrecord --shards N)"
        )
    shape = dataset.info.image_shape
    return (
        tf.data.Dataset.from_tensor_slices(files)
        .shuffle(len(files), seed=seed, reshuffle_each_iteration=False)
        .interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(len(files), TFRECORD_CYCLE_LENGTH),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .map(
            lambda record: tfrecords.parse_example(record, shape),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    )


def _options(policy: tf.data.experimental.AutoShardPolicy) -> tf.data.Options:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    # Parallel map/interleave must not reorder elements: resuming relies on the batch order.
    options.deterministic = True
    return options
