"""The distributed custom loop: replica equivalence, compile-once, loss going down."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from convstack.trainer.config import TrainConfig
from convstack.trainer.loop import DistributedTrainer
from convstack.trainer.strategy import StrategySetup, WorkerRole

IMAGE_SHAPE = (12, 12, 1)
NUM_CLASSES = 4


def mirrored(num_replicas: int) -> StrategySetup:
    devices = tuple(f"/cpu:{i}" for i in range(num_replicas))
    strategy = tf.distribute.MirroredStrategy(devices=list(devices))
    return StrategySetup(strategy, "MirroredStrategy", num_replicas, WorkerRole(), devices, False)


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        conv_blocks=2, filters=4, dense_units=8, dropout=0.0, batch_size=8, learning_rate=0.02
    )
    values.update(overrides)
    return TrainConfig(**values)


def global_batch(size: int, seed: int = 0):
    """Noise plus a bright patch in one of four quadrants; the quadrant is the label."""
    rng = np.random.default_rng(seed)
    images = 0.3 * rng.random((size, *IMAGE_SHAPE), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=size).astype(np.int64)
    half = IMAGE_SHAPE[0] // 2
    for image, label in zip(images, labels, strict=True):
        row, col = divmod(int(label), 2)
        image[row * half : (row + 1) * half, col * half : (col + 1) * half] += 0.7
    return images, labels


def one_step(setup: StrategySetup, config: TrainConfig, weights, batch) -> list[np.ndarray]:
    trainer = DistributedTrainer(setup, config, IMAGE_SHAPE, NUM_CLASSES)
    trainer.model.set_weights(weights)
    dataset = tf.data.Dataset.from_tensors(batch)
    iterator = iter(setup.strategy.experimental_distribute_dataset(dataset))
    trainer.train_steps(iterator, 1)
    return trainer.model.get_weights()


# SGD makes the check sensitive to the gradient's scale (summed vs averaged over replicas);
# Adam's first step is nearly sign(gradient) and would hide it.
@pytest.mark.parametrize(
    ("optimizer", "weight_decay"), [("sgd", 0.0), ("sgd", 1e-2), ("adam", 0.0)]
)
def test_one_step_with_two_replicas_equals_one_replica(optimizer, weight_decay):
    config = tiny_config(optimizer=optimizer, weight_decay=weight_decay)
    initial = DistributedTrainer(mirrored(1), config, IMAGE_SHAPE, NUM_CLASSES).model.get_weights()
    batch = global_batch(config.batch_size)

    after_one = one_step(mirrored(1), config, initial, batch)
    after_two = one_step(mirrored(2), config, initial, batch)

    moved = max(float(np.abs(a - b).max()) for a, b in zip(after_one, initial, strict=True))
    assert moved > 1e-3, "the step should change the weights noticeably"
    for one, two in zip(after_one, after_two, strict=True):
        np.testing.assert_allclose(two, one, atol=1e-5)


def test_steps_compile_once_and_loss_decreases():
    setup = mirrored(2)
    config = tiny_config()
    trainer = DistributedTrainer(setup, config, IMAGE_SHAPE, NUM_CLASSES)
    images, labels = global_batch(64, seed=1)
    train = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8, drop_remainder=True)
    evaluation = setup.strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((images, labels)).batch(24)  # 64 = 24+24+16
    )

    before = trainer.evaluate(evaluation)
    for _ in range(6):  # several "epochs", each with a fresh distributed iterator
        trainer.reset_train_totals()
        iterator = iter(setup.strategy.experimental_distribute_dataset(train.repeat(4)))
        trainer.train_steps(iterator, 5)
        trainer.train_steps(iterator, 3)  # a shorter tail chunk must not retrace
        totals = trainer.train_totals()
        assert totals.count == 8
        assert 0 <= totals.correct <= 8 * config.batch_size
    after = trainer.evaluate(evaluation)

    assert before.count == after.count == 64
    assert after.mean_loss < 0.5 * before.mean_loss
    assert after.correct > before.correct
    # The last epoch's training loss is on the same scale as the evaluated mean loss.
    assert totals.mean_loss < before.mean_loss
    assert trainer.trace_counts == {"train": 1, "eval": 1}


@pytest.mark.gpu
def test_one_step_on_every_visible_gpu_equals_one_replica():
    """The replica-equivalence rule on real GPUs: one MirroredStrategy step over every visible
    GPU (global batch split between them) moves the weights as one replica does. Where no GPU
    is visible the test is skipped, saying so; it runs wherever `make test` sees GPUs."""
    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        pytest.skip("no GPU visible to TensorFlow (tf.config.list_logical_devices('GPU') is empty)")
    devices = tuple(device.name for device in gpus)
    on_gpus = StrategySetup(
        tf.distribute.MirroredStrategy(devices=list(devices)),
        "MirroredStrategy",
        len(devices),
        WorkerRole(),
        devices,
        True,
    )
    config = tiny_config(optimizer="sgd", batch_size=8 * len(devices))
    initial = DistributedTrainer(mirrored(1), config, IMAGE_SHAPE, NUM_CLASSES).model.get_weights()
    batch = global_batch(config.batch_size, seed=2)

    after_one = one_step(mirrored(1), config, initial, batch)
    after_gpus = one_step(on_gpus, config, initial, batch)

    for one, gpu in zip(after_one, after_gpus, strict=True):
        np.testing.assert_allclose(gpu, one, atol=1e-4)  # GPU kernels round differently
