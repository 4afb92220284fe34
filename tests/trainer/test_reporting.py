"""The learning-curve PNG of a run shows the runs beside it too, so a second version's curves
stand against the first's."""

from __future__ import annotations

from dataclasses import replace

from convstack.trainer.export_record import ExportRecord, record_published
from convstack.trainer.reporting import (
    EpochRecord,
    learning_curves_figure,
    save_history,
    save_learning_curves,
    sibling_histories,
)


def _history(epochs: int, accuracy: float) -> list[EpochRecord]:
    record = EpochRecord(1, 10, 0.5, accuracy, 0.6, accuracy - 0.01, 1.0, 100.0)
    return [replace(record, epoch=e, step=10 * e, loss=0.5 / e) for e in range(1, epochs + 1)]


def test_runs_beside_a_run_are_found_with_the_version_they_exported(tmp_path):
    first, second, empty = tmp_path / "digits", tmp_path / "digits-v2", tmp_path / "scratch"
    empty.mkdir()
    save_history(first / "history.json", _history(3, 0.95))
    record_published(first, ExportRecord(global_step=30, export_id="x"), 1, tmp_path / "1")
    save_history(second / "history.json", _history(4, 0.97))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "history.json").write_text("[{}]")

    runs = sibling_histories(second)

    assert list(runs) == ["digits (version 1)"]  # not itself, nor the unreadable one
    assert [r.epoch for r in runs["digits (version 1)"]] == [1, 2, 3]


def test_the_figure_draws_train_and_validation_of_every_run(tmp_path):
    runs = {"digits (version 1)": _history(3, 0.95), "digits-v2 (this run)": _history(4, 0.97)}
    figure = learning_curves_figure(runs)
    loss_axis, accuracy_axis = figure.axes
    for axis in (loss_axis, accuracy_axis):
        assert [line.get_label() for line in axis.get_lines()] == [
            "digits (version 1): train",
            "digits (version 1): validation",
            "digits-v2 (this run): train",
            "digits-v2 (this run): validation",
        ]
    assert list(accuracy_axis.get_lines()[3].get_ydata()) == [0.96] * 4
    low, _ = accuracy_axis.get_ylim()
    assert 0.9 < low < 0.94  # zoomed in on where the runs differ, not 0..1


def test_save_learning_curves_writes_the_png_with_the_siblings(tmp_path):
    save_history(tmp_path / "digits" / "history.json", _history(3, 0.95))
    path = tmp_path / "digits-v2" / "learning_curves.png"
    save_learning_curves(_history(4, 0.97), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
