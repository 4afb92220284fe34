"""Checkpoint leftovers of dead writers (issue #19, defect 7)."""

from __future__ import annotations

from convstack.trainer.checkpoints import remove_dead_writers_leftovers


def test_leftovers_of_killed_saves_are_removed_and_complete_checkpoints_kept(tmp_path):
    complete = ["checkpoint", "ckpt-10.index", "ckpt-10.data-00000-of-00001"]
    for name in [*complete, "ckpt-20.data-00000-of-00001"]:  # ckpt-20: killed before its index
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "ckpt-20_temp").mkdir()
    (tmp_path / "ckpt-20_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")

    removed = remove_dead_writers_leftovers(tmp_path)

    assert removed == ["ckpt-20.data-00000-of-00001", "ckpt-20_temp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(complete)


def test_a_missing_directory_has_no_leftovers(tmp_path):
    assert remove_dead_writers_leftovers(tmp_path / "absent") == []
