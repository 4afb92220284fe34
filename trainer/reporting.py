"""What a run reports: per-epoch history (JSON), TensorBoard scalars, progress on the terminal
or as log lines, and the learning-curve PNG."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from convstack.common.files import write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    step: int  # global step at the end of the epoch
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    images_per_second: float


def load_history(path: Path, completed_epochs: int) -> list[EpochRecord]:
    """Records of the epochs a resumed run has already completed (later ones are dropped:
    they belong to an epoch that the restored checkpoint predates)."""
    if not path.exists():
        return []
    records = [EpochRecord(**item) for item in json.loads(path.read_text())]
    return [r for r in records if r.epoch <= completed_epochs]


def save_history(path: Path, history: list[EpochRecord]) -> None:
    write_json_atomic(path, [asdict(r) for r in history])


class TensorBoardLog:
    """Scalars under run_dir/tensorboard/{train,validation}, one point per epoch."""

    def __init__(self, log_dir: Path) -> None:
        import tensorflow as tf

        self._tf = tf
        self._train = tf.summary.create_file_writer(str(log_dir / "train"))
        self._validation = tf.summary.create_file_writer(str(log_dir / "validation"))

    def write(self, record: EpochRecord) -> None:
        tf = self._tf
        with self._train.as_default():
            tf.summary.scalar("loss", record.loss, step=record.step)
            tf.summary.scalar("accuracy", record.accuracy, step=record.step)
            tf.summary.scalar("images_per_second", record.images_per_second, step=record.step)
        with self._validation.as_default():
            tf.summary.scalar("loss", record.val_loss, step=record.step)
            tf.summary.scalar("accuracy", record.val_accuracy, step=record.step)
        self._train.flush()
        self._validation.flush()


class EpochProgress:
    """A tqdm bar over one epoch's steps on a terminal; silent otherwise (epoch log lines
    carry the figures)."""

    def __init__(self, mode: str, epoch: int, epochs: int, total: int, initial: int) -> None:
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self._bar = None
        self._loss_shown_at = 0.0
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=f"epoch {epoch}/{epochs}",
                unit="step",
                leave=False,
                dynamic_ncols=True,
            )

    def update(self, steps: int, read_loss: Callable[[], float]) -> None:
        """Advance by `steps`; `read_loss` (which waits for the device) is called only when
        a bar is shown, and at most twice a second."""
        if self._bar is None:
            return
        self._bar.update(steps)
        now = time.monotonic()
        if now - self._loss_shown_at >= 0.5:
            self._bar.set_postfix(loss=f"{read_loss():.4f}")
            self._loss_shown_at = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def save_learning_curves(history: list[EpochRecord], path: Path) -> None:
    """Loss and accuracy per epoch, train vs validation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [r.epoch for r in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [r.loss for r in history], marker="o", label="train")
    loss_axis.plot(epochs, [r.val_loss for r in history], marker="o", label="validation")
    loss_axis.set(title="loss", xlabel="epoch")
    accuracy_axis.plot(epochs, [r.accuracy for r in history], marker="o", label="train")
    accuracy_axis.plot(epochs, [r.val_accuracy for r in history], marker="o", label="validation")
    accuracy_axis.set(title="accuracy", xlabel="epoch", ylim=(0, 1.0))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
