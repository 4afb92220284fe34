"""The distributed custom training loop: GradientTape steps run through `strategy.run` inside
`tf.function`, several steps per call, with losses averaged over the *global* batch."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import keras
import tensorflow as tf

from convstack.trainer.config import TrainConfig
from convstack.trainer.model import build_model
from convstack.trainer.strategy import StrategySetup


@dataclass(frozen=True)
class StepTotals:
    """Sums over the steps or batches of one call, reduced across all replicas."""

    loss_sum: float  # train: sum of per-step global-mean losses; eval: sum of per-example losses
    correct: int
    count: int  # train: steps; eval: examples

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.count, 1)


def make_optimizer(config: TrainConfig, on_gpu: bool) -> keras.optimizers.Optimizer:
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(config.learning_rate, momentum=0.9, nesterov=True)
    else:
        optimizer = keras.optimizers.Adam(config.learning_rate)
    if config.mixed_precision and on_gpu:
        # float16 gradients underflow without loss scaling; bfloat16 (CPU) has float32's range.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def mixed_precision_policy(on_gpu: bool) -> str:
    return "mixed_float16" if on_gpu else "mixed_bfloat16"


class DistributedTrainer:
    """Owns the model and optimizer (created under the strategy's scope) and the compiled steps.

    `trace_counts` records how often each step function was traced, so tests can prove that the
    train and eval steps are compiled once.
    """

    def __init__(
        self,
        setup: StrategySetup,
        config: TrainConfig,
        image_shape: tuple[int, int, int],
        num_classes: int,
    ) -> None:
        self.strategy = setup.strategy
        self.global_batch_size = config.batch_size
        self.trace_counts: Counter[str] = Counter()
        with self.strategy.scope():
            self.model = build_model(config.model_part(), image_shape, num_classes)
            self.optimizer = make_optimizer(config, setup.on_gpu)
            # Keras 3 creates slot variables lazily; inside strategy.run that fails with
            # "You must feed a value for placeholder tensor", so build them here.
            self.optimizer.build(self.model.trainable_variables)
            # Replica-local accumulators summed only when read (like Keras metrics): no
            # cross-replica reduction and no host sync per step.
            self._loss_total = _on_read_sum(tf.float32, "train_loss_total")
            self._correct_total = _on_read_sum(tf.int64, "train_correct_total")
            self._steps_total = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        self._train_chunk = tf.function(self._train_chunk_fn)
        self._evaluate = tf.function(self._evaluate_fn)

    # --- per-replica computations -------------------------------------------------------

    def _replica_train_step(self, images, labels):
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            per_example = self._loss(labels, logits)
            # Divide by the global batch, not the replica's: the optimizer sums gradients
            # across replicas, so the result is the gradient of the global mean loss.
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch_size)
            if self.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
            scaled_loss = self.optimizer.scale_loss(loss)
        variables = self.model.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        # Each replica's loss is already divided by the global batch: their sum is the mean.
        self._loss_total.assign_add(loss)
        self._correct_total.assign_add(_count_correct(labels, logits))

    def _replica_eval_step(self, images, labels):
        logits = self.model(images, training=False)
        per_example = self._loss(labels, logits)
        count = tf.shape(labels, out_type=tf.int64)[0]
        return tf.reduce_sum(per_example), _count_correct(labels, logits), count

    # --- compiled functions ---------------------------------------------------------------

    def _train_chunk_fn(self, iterator, steps):
        self.trace_counts["train"] += 1
        for _ in tf.range(steps):
            self.strategy.run(self._replica_train_step, args=next(iterator))
        self._steps_total.assign_add(tf.cast(steps, tf.int64))

    def _evaluate_fn(self, distributed_dataset):
        self.trace_counts["eval"] += 1
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0, tf.int64)
        count = tf.constant(0, tf.int64)
        for batch in distributed_dataset:
            batch_loss, batch_correct, batch_count = self.strategy.run(
                self._replica_eval_step, args=batch
            )
            loss_sum += self.strategy.reduce(tf.distribute.ReduceOp.SUM, batch_loss, axis=None)
            correct += self.strategy.reduce(tf.distribute.ReduceOp.SUM, batch_correct, axis=None)
            count += self.strategy.reduce(tf.distribute.ReduceOp.SUM, batch_count, axis=None)
        return loss_sum, correct, count

    # --- public API -----------------------------------------------------------------------

    def train_steps(self, iterator, steps: int) -> None:
        """Run `steps` training steps from a distributed iterator in one compiled call.

        Does not wait for the result: read `train_totals()` when the figures are needed.
        """
        self._train_chunk(iterator, tf.constant(steps, tf.int32))

    def train_totals(self) -> StepTotals:
        """Loss and correct predictions summed over the steps since `reset_train_totals()`."""
        return StepTotals(
            float(self._loss_total.read_value()),
            int(self._correct_total.read_value()),
            int(self._steps_total.read_value()),
        )

    def reset_train_totals(self) -> None:
        for variable in (self._loss_total, self._correct_total, self._steps_total):
            variable.assign(tf.zeros_like(variable))

    def evaluate(self, distributed_dataset) -> StepTotals:
        """Loss and correct predictions over a whole distributed dataset (compiled once per
        dataset object: reuse the same one every epoch)."""
        loss_sum, correct, count = self._evaluate(distributed_dataset)
        return StepTotals(float(loss_sum), int(correct), int(count))

    def agree_to_stop(self, local_request: bool) -> bool:
        """True when any worker asked to stop; every worker must call this at the same step."""
        if self.strategy.extended._in_multi_worker_mode():
            return bool(self._any_worker(tf.constant(local_request)))
        return local_request

    @tf.function
    def _any_worker(self, flag):
        # ReduceOp has only SUM and MEAN: a positive sum means some worker asked.
        values = self.strategy.run(lambda: tf.cast(flag, tf.int32))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None) > 0


def _on_read_sum(dtype, name: str) -> tf.Variable:
    return tf.Variable(
        tf.zeros([], dtype),
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.SUM,
    )


def _count_correct(labels, logits):
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int64)
    return tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(labels, tf.int64)), tf.int64))
