"""Checkpoints of a run directory: where each worker writes, resuming, and refusing to resume a
run directory that belongs to a different configuration."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import tensorflow as tf

from convstack.common.files import write_json_atomic
from convstack.trainer.errors import ConfigError
from convstack.trainer.model import rng_states
from convstack.trainer.strategy import WorkerRole

log = logging.getLogger(__name__)


def worker_scratch_dir(run_dir: Path, role: WorkerRole) -> Path:
    """Where a non-chief worker writes what only the chief keeps (removed after each save)."""
    return run_dir / f".scratch-{role.task_type}-{role.task_index}"


class RunCheckpoints:
    """tf.train.CheckpointManager over run_dir/checkpoints holding the model, the optimizer, the
    global step, the completed epochs and the model's random state (dropout), so that a resumed
    run takes the very steps the uninterrupted one would have taken. (The data position needs
    no state: batches are a pure function of seed, epoch and step, trainer/pipeline.py.)

    Under MultiWorkerMirroredStrategy every worker must take part in saving; only the chief's
    files are kept, the others write to a scratch directory that is deleted afterwards.
    """

    def __init__(self, run_dir: Path, role: WorkerRole, model, optimizer, keep: int) -> None:
        self.directory = run_dir / "checkpoints"
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
        # The epoch is derivable from the step; it is saved so a checkpoint reads on its own.
        self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._parts = dict(model=model, optimizer=optimizer, step=self._step, epoch=self._epoch)
        self._rng = rng_states(model)
        self._checkpoint = tf.train.Checkpoint(**self._parts, rng=self._rng)
        write_dir = self.directory if role.is_chief else worker_scratch_dir(run_dir, role)
        # Each writer is alone in its directory (the chief in checkpoints/, a worker in its
        # scratch), so what it finds there at start was left by a dead predecessor.
        remove_dead_writers_leftovers(write_dir)
        self._scratch = None if role.is_chief else write_dir
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, str(write_dir), max_to_keep=keep
        )

    def restore_latest(self) -> int:
        """Restore the chief's newest checkpoint, if any; return its global step (else 0)."""
        latest = tf.train.latest_checkpoint(str(self.directory))
        if latest:
            try:
                self._checkpoint_for(latest).restore(latest).assert_existing_objects_matched()
            except (ValueError, AssertionError, tf.errors.OpError) as exc:
                # A checkpoint of another model shape is bad input, not a failure to retry.
                raise ConfigError(
                    f"{latest}: checkpoint does not fit the model ({_first_line(exc)}); "
                    "resume with the settings it was written with, or use a new --run-dir"
                ) from exc
            log.info("resumed from %s (step %d)", latest, int(self._step.numpy()))
        return int(self._step.numpy())

    def _checkpoint_for(self, path: str) -> tf.train.Checkpoint:
        """The checkpoint object that reads `path`: one written before the random state was
        saved resumes without it (its dropout masks then differ from an unbroken run's)."""
        saved = [name for name, _ in tf.train.list_variables(path)]
        if not self._rng or any(name.startswith("rng/") for name in saved):
            return self._checkpoint
        log.warning("%s holds no random state: the resumed run will not repeat the original", path)
        return tf.train.Checkpoint(**self._parts)

    def save(self, step: int, epoch: int) -> None:
        self._step.assign(step)
        self._epoch.assign(epoch)
        self._manager.save(checkpoint_number=step)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


def remove_dead_writers_leftovers(directory: Path) -> list[str]:
    """Remove what killed checkpoint saves leave in `directory`: `ckpt-N_temp*` staging
    folders, and data files of a checkpoint that has no index (the index is written last).
    Call only where no other process writes. Returns the names removed."""
    if not directory.is_dir():
        return []
    indexed = {path.name.removesuffix(".index") for path in directory.glob("*.index")}
    removed = []
    for path in sorted(directory.iterdir()):
        prefix = path.name.split(".data-")[0]
        temp = "_temp" in path.name and path.name.startswith("ckpt-")
        orphan = ".data-" in path.name and prefix not in indexed
        if temp or orphan:
            log.info("removing %s, left by a checkpoint save that did not finish", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def check_run_identity(path: Path, identity: dict) -> None:
    """A run directory resumes only the run it was made for: same data, batch, model, seed,
    optimizer. A resume that changes any of them is refused (ConfigError, exit 2) naming the
    settings; --epochs may grow (training longer resumes and continues)."""
    if not path.exists():
        return
    recorded = _flat(json.loads(path.read_text()))
    wanted = _flat(identity)
    differing = [k for k in wanted if k in recorded and recorded[k] != wanted[k]]
    if differing:
        details = ", ".join(
            f"{_flag(k)} {wanted[k]!r} (the run has {recorded[k]!r})" for k in differing
        )
        raise ConfigError(
            f"{path.parent}: cannot resume with {details}: these settings are fixed for a run; "
            "use a new --run-dir"
        )


def check_learning_rate(optimizer, wanted: float, step: int) -> None:
    """Refuse (exit 2) a resume whose --learning-rate differs from the restored optimizer's.

    The rate is fixed for a run rather than applied on resume: a run with one rate and one
    record of it stays reproducible, and its model card cannot claim a rate that trained only
    part of it. The restored optimizer is the truth, so this holds for run directories
    without run.json too.
    """
    if step == 0:
        return
    restored = float(optimizer.learning_rate.numpy())
    if not math.isclose(restored, wanted, rel_tol=1e-6):
        raise ConfigError(
            f"cannot resume with --learning-rate {wanted!r}: the run's checkpoint at step {step} "
            f"was trained with {restored:.6g}; the learning rate is fixed for a run, "
            "use a new --run-dir"
        )


def record_run_identity(path: Path, identity: dict) -> None:
    """Write run.json the first time a run directory is used (after its checkpoint, if any,
    was found to fit: a refused resume must not record the refused settings)."""
    if not path.exists():
        write_json_atomic(path, identity)


def _flat(identity: dict) -> dict:
    """{"model": {"filters": 8}} -> {"filters": 8}: the names the flags have."""
    flat = {}
    for key, value in identity.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def _flag(key: str) -> str:
    if key == "data_fingerprint":
        return "--data (fingerprint)"
    return "--" + key.replace("_", "-")


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
