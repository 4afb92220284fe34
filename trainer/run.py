"""One training run from config to exported version: data -> strategy -> distributed loop with
checkpoints and preemption -> test evaluation -> atomic versioned export."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import tensorflow as tf

from convstack.trainer import cluster, crash_points, export_record, pipeline, preemption
from convstack.trainer.checkpoints import (
    RunCheckpoints,
    check_learning_rate,
    check_run_identity,
    record_run_identity,
    worker_scratch_dir,
)
from convstack.trainer.config import TrainConfig
from convstack.trainer.data import Dataset, load_dataset
from convstack.trainer.errors import Preempted, VersionExistsError
from convstack.trainer.export import ExportResult, export_origin, export_version, find_export
from convstack.trainer.loop import DistributedTrainer, StepTotals, mixed_precision_policy
from convstack.trainer.reporting import (
    EpochProgress,
    EpochRecord,
    TensorBoardLog,
    load_history,
    save_history,
    save_learning_curves,
)
from convstack.trainer.strategy import (
    StrategySetup,
    WorkerRole,
    parse_tf_config,
    select_strategy,
)

log = logging.getLogger(__name__)

# How a collective fails when a peer dies (a broken connection, or the others abort it).
PEER_LOST = (
    tf.errors.UnavailableError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
    tf.errors.DeadlineExceededError,
)
# What a rerun does after a stop, for the one line a preempted run ends with.
NOTHING_WRITTEN = "nothing was written; rerun with the same --run-dir"
RESUMES = "rerun with the same --run-dir to resume from its latest checkpoint"


@dataclass
class TrainResult:
    test_accuracy: float
    test_loss: float
    global_step: int
    training_seconds: float
    history: list[EpochRecord]
    export: ExportResult | None
    strategy: str
    num_replicas: int
    is_chief: bool


def train(config: TrainConfig) -> TrainResult:
    """Train (resuming from run_dir when it holds a checkpoint), evaluate and export."""
    _refuse_existing_version(config)
    tf_config = os.environ.get("TF_CONFIG")
    role = parse_tf_config(tf_config)
    peers = cluster.peers(tf_config, f"{role.task_type}:{role.task_index}")
    try:
        training = _start(config, tf_config, role, peers)
        return training.execute()
    except PEER_LOST as exc:
        if not role.is_multi_worker:
            raise
        raise cluster.PeerError(cluster.lost_peer_message(exc, peers)) from exc


def _start(
    config: TrainConfig, tf_config: str | None, role: WorkerRole, peers: list[cluster.Peer]
) -> TrainingRun:
    # The strategy comes first: splitting the CPU into replicas must precede any TF operation.
    setup = _create_strategy(config, tf_config, role, peers)
    _safe_point("strategy-created", "start-up", NOTHING_WRITTEN)
    # The rest of the start-up (its first collectives create and restore the variables) under
    # a backstop bound: cluster.startup_deadline.
    with (
        cluster.startup_deadline(config.cluster_wait_seconds)
        if role.is_multi_worker
        else contextlib.nullcontext()
    ):
        dataset = load_dataset(
            config.data,
            seed=config.seed,
            validation_fraction=config.validation_fraction,
            test_fraction=config.test_fraction,
        )
        _safe_point("data-loaded", "data loading", NOTHING_WRITTEN)
        if config.mixed_precision:
            keras.mixed_precision.set_global_policy(mixed_precision_policy(setup.on_gpu))
        keras.utils.set_random_seed(config.seed)  # same initial weights on every worker and rerun
        return TrainingRun(config, setup, dataset)


def _create_strategy(
    config: TrainConfig, tf_config: str | None, role: WorkerRole, peers: list[cluster.Peer]
) -> StrategySetup:
    """The strategy; with several workers, joining the cluster, bounded by
    --cluster-wait-seconds (trainer/cluster.py)."""
    if not role.is_multi_worker:
        return select_strategy(config.replicas, tf_config)
    cluster.bound_cluster_forming(tf_config, config.cluster_wait_seconds)
    cluster.log_waiting(peers, config.cluster_wait_seconds)
    try:
        # TensorFlow's own C++ errors of a failed join are dropped when quiet: the one line
        # below says what happened (cluster.joining_output).
        with cluster.joining_output():
            return select_strategy(config.replicas, tf_config)
    except PEER_LOST as exc:
        # A SIGTERM that came while TensorFlow waited (it holds the interpreter meanwhile).
        preemption.stop_if_requested("start-up", NOTHING_WRITTEN)
        message = cluster.not_formed_message(exc, peers, config.cluster_wait_seconds)
        raise cluster.PeerError(message) from exc


def _safe_point(point: str, phase: str, consequence: str) -> None:
    """A point where the run may stop: fault injection first (trainer/crash_points.py), then a
    SIGTERM that arrived since the last safe point."""
    crash_points.reached(point)
    preemption.stop_if_requested(phase, consequence)


def _refuse_existing_version(config: TrainConfig) -> None:
    """Fail before training, not after, when the requested version already exists (unless
    this run directory published it, and a rerun is to finish recording that)."""
    if config.export and config.version is not None:
        target = Path(config.model_base) / config.model_name / str(config.version)
        record = export_record.read_record(Path(config.run_dir))
        ours = record is not None and record.export_id is not None
        if target.exists() and not (ours and export_origin(target) == record.export_id):
            raise VersionExistsError(
                f"{target}: version {config.version} already exists; versions are never "
                "overwritten (omit --version to export the next one)"
            )


class TrainingRun:
    """The state of one run: where it is (global step), what it has recorded, where it writes."""

    def __init__(self, config: TrainConfig, setup: StrategySetup, dataset: Dataset) -> None:
        self.config = config
        self.setup = setup
        self.dataset = dataset
        self.run_dir = Path(config.run_dir)
        self.is_chief = setup.role.is_chief
        self.steps_per_epoch = pipeline.steps_per_epoch(dataset, config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        check_run_identity(self.run_dir / "run.json", self._identity())

        info = dataset.info
        self.trainer = DistributedTrainer(setup, config, info.image_shape, info.num_classes)
        self.checkpoints = RunCheckpoints(
            self.run_dir, setup.role, self.trainer.model, self.trainer.optimizer,
            config.keep_checkpoints,
        )  # fmt: skip
        self.step = self.checkpoints.restore_latest()
        check_learning_rate(self.trainer.optimizer, config.learning_rate, self.step)
        if self.is_chief:
            record_run_identity(self.run_dir / "run.json", self._identity())
        completed_epochs = self.step // self.steps_per_epoch
        self.history = load_history(self.run_dir / "history.json", completed_epochs)
        self.tensorboard = TensorBoardLog(self.run_dir / "tensorboard") if self.is_chief else None
        self.validation = self._distributed_eval("validation")
        _safe_point("restored", "start-up", RESUMES)

    def execute(self) -> TrainResult:
        started = time.perf_counter()
        if self.step < self.total_steps:
            log.info(
                "training %d steps (%d per epoch, global batch %d) from step %d",
                self.total_steps, self.steps_per_epoch, self.config.batch_size, self.step,
            )  # fmt: skip
        while self.step < self.total_steps:
            self._run_epoch()
        training_seconds = time.perf_counter() - started
        trained = f"checkpoint {self.step} holds the trained model; {RESUMES}, evaluate and export"
        _safe_point("trained", "evaluation", trained)

        test = self.trainer.evaluate(self._distributed_eval("test"))
        _safe_point("evaluated", "evaluation", trained)
        log.info("test accuracy %.4f, loss %.4f on %d images", _accuracy(test),
                 test.mean_loss, test.count)  # fmt: skip
        if self.is_chief and self.history:
            save_learning_curves(self.history, self.run_dir / "learning_curves.png")
        exported = self._export_once(test, training_seconds) if self.config.export else None
        if not self.is_chief:
            shutil.rmtree(worker_scratch_dir(self.run_dir, self.setup.role), ignore_errors=True)
        # Late, but still a SIGTERM: exit 75 like every other one (a rerun finds the run done).
        preemption.stop_if_requested("export", "the run is complete; a rerun publishes nothing")
        return TrainResult(
            _accuracy(test), test.mean_loss, self.step, training_seconds, self.history,
            exported, self.setup.name, self.setup.num_replicas, self.is_chief,
        )  # fmt: skip

    # --- the epoch loop -------------------------------------------------------------------

    def _run_epoch(self) -> None:
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        batches = pipeline.training_batches(
            self.dataset, global_batch_size=self.config.batch_size, seed=self.config.seed,
            epoch=epoch, skip_batches=offset, num_workers=self.setup.role.num_workers,
        )  # fmt: skip
        # repeat(): with FILE sharding workers may hold slightly different numbers of
        # examples; one that runs out early re-reads its files instead of stalling the others.
        # Epoch length is set by steps_per_epoch, so in-memory sources never reach the repeat.
        batches = batches.repeat()
        iterator = iter(self.setup.strategy.experimental_distribute_dataset(batches))
        progress = EpochProgress(
            self.config.progress, epoch + 1, self.config.epochs, self.steps_per_epoch, offset
        )
        self.trainer.reset_train_totals()
        started = time.perf_counter()
        try:
            while offset < self.steps_per_epoch:
                steps = self._next_chunk(offset)
                self.trainer.train_steps(iterator, steps)
                offset += steps
                self.step += steps
                progress.update(steps, lambda: self.trainer.train_totals().mean_loss)
                crash_points.reached(crash_points.step_point(self.step))
                if offset == self.steps_per_epoch:
                    break  # the epoch-end checkpoint is written with the epoch's record
                if self.step % self.config.checkpoint_every == 0:
                    self._save()
                if self.trainer.agree_to_stop(preemption.requested()):
                    self._stop_preempted()
        finally:
            progress.close()
        totals = self.trainer.train_totals()  # waits for the epoch's last step
        seconds = time.perf_counter() - started
        self._end_epoch(self._epoch_record(epoch + 1, totals, seconds))

    def _end_epoch(self, record: EpochRecord) -> None:
        """Record the epoch, then write the checkpoint that counts it: a checkpoint at an epoch
        end always has its record in history.json. A kill between the two resumes from the
        previous checkpoint, and load_history drops the record of the epoch it repeats, so
        every epoch is recorded exactly once."""
        self._record(record)
        crash_points.reached("epoch-recorded")
        self._save()
        if self.trainer.agree_to_stop(preemption.requested()):
            raise self._preempted()  # saved just now, with the record

    def _next_chunk(self, offset: int) -> int:
        """Steps for the next compiled call: never past the epoch end or a checkpoint
        boundary, so checkpoints land on the same steps however the run was interrupted."""
        to_checkpoint = self.config.checkpoint_every - self.step % self.config.checkpoint_every
        return min(self.config.steps_per_execution, self.steps_per_epoch - offset, to_checkpoint)

    def _stop_preempted(self) -> None:
        self._save()
        if self.is_chief:
            save_history(self.run_dir / "history.json", self.history)
        raise self._preempted()

    def _preempted(self) -> Preempted:
        return Preempted(
            f"preempted at step {self.step} of {self.total_steps} (SIGTERM "
            f"{preemption.seconds_since_request():.1f}s ago); checkpoint in "
            f"{self.checkpoints.directory}, rerun with the same --run-dir to resume"
        )

    def _save(self) -> None:
        self.checkpoints.save(self.step, self.step // self.steps_per_epoch)

    def _epoch_record(self, epoch: int, totals: StepTotals, seconds: float) -> EpochRecord:
        evaluated = self.trainer.evaluate(self.validation)
        images = totals.count * self.config.batch_size
        record = EpochRecord(
            epoch=epoch,
            step=self.step,
            loss=totals.mean_loss,
            accuracy=totals.correct / max(images, 1),
            val_loss=evaluated.mean_loss,
            val_accuracy=_accuracy(evaluated),
            seconds=seconds,
            images_per_second=images / max(seconds, 1e-9),
        )
        log.info(
            "epoch %d/%d: loss %.4f accuracy %.4f | val_loss %.4f val_accuracy %.4f | "
            "%.1fs, %.0f images/s",
            record.epoch, self.config.epochs, record.loss, record.accuracy, record.val_loss,
            record.val_accuracy, record.seconds, record.images_per_second,
        )  # fmt: skip
        return record

    def _record(self, record: EpochRecord) -> None:
        self.history.append(record)
        if self.is_chief:
            save_history(self.run_dir / "history.json", self.history)
            self.tensorboard.write(record)

    # --- helpers --------------------------------------------------------------------------

    def _identity(self) -> dict:
        return {
            "data_fingerprint": self.dataset.info.fingerprint,
            "batch_size": self.config.batch_size,
            "seed": self.config.seed,
            "model": self.config.model_part().model_dump(),
            "optimizer": self.config.optimizer,
            "learning_rate": self.config.learning_rate,
        }

    def _distributed_eval(self, split: str):
        batches = pipeline.evaluation_batches(
            self.dataset, split, global_batch_size=self.config.batch_size
        )
        return self.setup.strategy.experimental_distribute_dataset(batches)

    # --- export ---------------------------------------------------------------------------

    def _export_once(self, test: StepTotals, training_seconds: float) -> ExportResult | None:
        """Export, unless this run directory already exported this very step (a restarted Job
        must not publish the same training twice, wherever the last attempt was killed:
        trainer/export_record.py)."""
        record = export_record.read_record(self.run_dir)
        preemption.stop_if_requested("export", RESUMES)
        if record is not None and record.published and record.global_step == self.step:
            log.info("run already exported version %s at step %d: %s",
                     record.version, self.step, record.path)  # fmt: skip
            return None
        if not self.is_chief:  # a non-chief publishes nothing, so it records nothing
            return self._export(test, training_seconds, export_id=None)
        export_id = export_record.export_id_for(record, self.step)
        intent = export_record.record_intent(self.run_dir, self.step, export_id)
        crash_points.reached("intent-recorded")
        model_dir = Path(self.config.model_base) / self.config.model_name
        result = find_export(model_dir, export_id)
        if result is not None:
            log.info("version %d holds this run's export from before a crash; not exporting "
                     "it again", result.version)  # fmt: skip
        else:
            result = self._export(test, training_seconds, export_id)
        crash_points.reached("exported")
        export_record.record_published(self.run_dir, intent, result.version, result.path)
        return result

    def _export(
        self, test: StepTotals, training_seconds: float, export_id: str | None
    ) -> ExportResult:
        test_images, test_labels = self.dataset.arrays("test")
        representative, _ = self.dataset.arrays("train", limit=200)
        return export_version(
            self.trainer.model,
            model_base=self.config.model_base,
            model_name=self.config.model_name,
            version=self.config.version,
            test_images=test_images,
            test_labels=test_labels,
            representative_images=representative,
            card_fields=self._card_fields(test, training_seconds),
            tflite=self.config.tflite,
            is_chief=self.is_chief,
            export_id=export_id,
        )

    def _card_fields(self, test: StepTotals, training_seconds: float) -> dict:
        return {
            "dataset": self.dataset.info.to_json(),
            "test_metrics": {
                "accuracy": _accuracy(test),
                "loss": test.mean_loss,
                "examples": test.count,
            },
            "training": {
                "config": self.config.model_dump(),
                "strategy": self.setup.name,
                "replicas": self.setup.num_replicas,
                "workers": self.setup.role.num_workers,
                "global_steps": self.step,
                "epochs": self.config.epochs,
                "seconds": round(training_seconds, 3),
                "run_dir": str(self.run_dir),
                "final_epoch": asdict(self.history[-1]) if self.history else None,
                "precision_policy": keras.mixed_precision.global_policy().name,
            },
        }


def _accuracy(totals: StepTotals) -> float:
    return totals.correct / max(totals.count, 1)
