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


def sibling_histories(run_dir: Path) -> dict[str, list[EpochRecord]]:
    """The other runs beside `run_dir` (directories of the same parent with a history.json),
    by label: the directory's name, and the version it exported when it did."""
    run_dir = Path(run_dir).resolve()
    runs = {}
    for history_path in sorted(run_dir.parent.glob("*/history.json")):
        other = history_path.parent
        if other == run_dir:
            continue
        try:
            history = load_history(history_path, completed_epochs=10**9)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("learning curves: %s left out (%s)", history_path, exc)
            continue
        runs[_run_label(other)] = history
    return runs


def _run_label(run_dir: Path) -> str:
    from convstack.trainer.export_record import read_record

    record = read_record(run_dir)
    version = record.version if record is not None else None
    return f"{run_dir.name} (version {version})" if version else run_dir.name


def save_learning_curves(
    history: list[EpochRecord], path: Path, others: dict[str, list[EpochRecord]] | None = None
) -> None:
    """Loss and accuracy per epoch, train (solid) and validation (dashed), as a PNG in the run
    directory; `others` (by default the runs beside it, see sibling_histories) are drawn in
    their own colours, so a second run shows against the first."""
    path = Path(path)
    others = sibling_histories(path.parent) if others is None else others
    figure = learning_curves_figure({**others, f"{path.parent.name} (this run)": history})
    from matplotlib import pyplot as plt  # after learning_curves_figure chose the backend

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def learning_curves_figure(runs: dict[str, list[EpochRecord]]):
    """The figure of save_learning_curves: a colour per run, loss (log scale) and accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for index, (label, records) in enumerate(runs.items()):
        color = f"C{index % 10}"
        epochs = [r.epoch for r in records]
        for axis, train, validation in (
            (loss_axis, [r.loss for r in records], [r.val_loss for r in records]),
            (accuracy_axis, [r.accuracy for r in records], [r.val_accuracy for r in records]),
        ):
            axis.plot(epochs, train, color=color, marker=".", label=f"{label}: train")
            axis.plot(epochs, validation, color=color, linestyle="--", marker=".",
                      label=f"{label}: validation")  # fmt: skip
    loss_axis.set(title="loss", xlabel="epoch", yscale="log")
    accuracy_axis.set(title="accuracy", xlabel="epoch", ylim=(accuracy_floor(runs.values()), 1.0))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    accuracy_axis.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    return figure


def accuracy_floor(runs) -> float:
    """Where the accuracy axis starts: just under the lowest accuracy after the first
    quarter of each run, so that runs a point apart stay apart on the picture."""
    values = [
        value
        for records in runs
        for r in records[len(records) // 4 :]
        for value in (r.accuracy, r.val_accuracy)
    ]
    return max(0.0, min(values, default=0.0) - 0.02)
