"""Checkpoints of a run directory: where each worker writes, resuming, and refusing to resume a
run directory that belongs to a different configuration."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import tensorflow as tf

from convstack.common.files import write_json_atomic
from convstack.trainer.errors import ConfigError
from convstack.trainer.strategy import WorkerRole

log = logging.getLogger(__name__)


def worker_scratch_dir(run_dir: Path, role: WorkerRole) -> Path:
    """Where a non-chief worker writes what only the chief keeps (removed after each save)."""
    return run_dir / f".scratch-{role.task_type}-{role.task_index}"


class RunCheckpoints:
    """tf.train.CheckpointManager over run_dir/checkpoints holding the model, the optimizer, the
    global step and the completed epochs.

    Under MultiWorkerMirroredStrategy every worker must take part in saving; only the chief's
    files are kept, the others write to a scratch directory that is deleted afterwards.
    """

    def __init__(self, run_dir: Path, role: WorkerRole, model, optimizer, keep: int) -> None:
        self.directory = run_dir / "checkpoints"
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
        # The epoch is derivable from the step; it is saved so a checkpoint reads on its own.
        self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, step=self._step, epoch=self._epoch
        )
        write_dir = self.directory if role.is_chief else worker_scratch_dir(run_dir, role)
        self._scratch = None if role.is_chief else write_dir
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, str(write_dir), max_to_keep=keep
        )

    def restore_latest(self) -> int:
        """Restore the chief's newest checkpoint, if any; return its global step (else 0)."""
        latest = tf.train.latest_checkpoint(str(self.directory))
        if latest:
            self._checkpoint.restore(latest).assert_existing_objects_matched()
            log.info("resumed from %s (step %d)", latest, int(self._step.numpy()))
        return int(self._step.numpy())

    def save(self, step: int, epoch: int) -> None:
        self._step.assign(step)
        self._epoch.assign(epoch)
        self._manager.save(checkpoint_number=step)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


def check_run_identity(path: Path, identity: dict, is_chief: bool) -> None:
    """A run directory resumes only the run it was made for: same data, batch, model, seed.

    Epochs may grow (training longer resumes and continues).
    """
    if path.exists():
        recorded = json.loads(path.read_text())
        differing = sorted(k for k in identity if recorded.get(k) != identity[k])
        if differing:
            details = ", ".join(f"{k}: {recorded.get(k)!r} != {identity[k]!r}" for k in differing)
            raise ConfigError(
                f"{path.parent}: run directory belongs to a different run ({details}); "
                "use a new --run-dir"
            )
    elif is_chief:
        write_json_atomic(path, identity)
