"""The versions of a model on disk (serving/rollout/repository.py): model cards, ages, which
versions to retire, and deleting one without a server ever seeing half of it."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from convstack.serving.rollout.repository import (
    MODEL_CARD,
    RepositoryError,
    delete_version,
    find_version,
    list_versions,
    versions_to_retire,
)
from convstack.serving.version_policy import numeric_version_dirs

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.timezone.utc)


def add_version(base: Path, version: int | str, card: dict | str | None = None) -> Path:
    """A version directory with a few files (and a model card when given)."""
    path = base / str(version)
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"graph")
    (path / "variables" / "variables.index").write_bytes(b"index")
    if card is not None:
        (path / MODEL_CARD).parent.mkdir()
        text = card if isinstance(card, str) else json.dumps(card)
        (path / MODEL_CARD).write_text(text)
    return path


def card(created: str, accuracy: float, uri: str = "digits") -> dict:
    return {
        "created": created,
        "dataset": {"uri": uri, "fingerprint": "sha256:abc"},
        "test_metrics": {"accuracy": accuracy, "loss": 0.1},
    }


def test_versions_with_cards_are_listed_in_version_order(tmp_path):
    add_version(tmp_path, 10, card("2025-06-01T10:00:00+00:00", 0.97))
    add_version(tmp_path, 2, card("2025-05-31T12:00:00+00:00", 0.95, uri="npz:/d.npz"))
    versions = list_versions(tmp_path)
    assert [v.version for v in versions] == [2, 10]
    old, new = versions
    assert old.path == tmp_path / "2"
    assert old.test_metrics == {"accuracy": 0.95, "loss": 0.1}
    assert old.dataset_uri == "npz:/d.npz"
    assert old.age(NOW) == dt.timedelta(days=1)
    assert new.age(NOW) == dt.timedelta(hours=2)


def test_a_card_time_without_zone_is_utc(tmp_path):
    add_version(tmp_path, 1, card("2025-06-01T11:00:00", 0.9))
    (version,) = list_versions(tmp_path)
    assert version.created == dt.datetime(2025, 6, 1, 11, 0, tzinfo=dt.timezone.utc)


def test_without_a_card_the_age_is_the_directory_mtime(tmp_path):
    path = add_version(tmp_path, 3)
    stamp = (NOW - dt.timedelta(minutes=5)).timestamp()
    os.utime(path, (stamp, stamp))
    (version,) = list_versions(tmp_path)
    assert version.card == {}
    assert version.test_metrics == {}
    assert version.dataset_uri is None
    assert version.age(NOW) == dt.timedelta(minutes=5)


def test_a_card_without_a_creation_time_falls_back_to_the_mtime(tmp_path):
    path = add_version(tmp_path, 3, {"test_metrics": {"accuracy": 0.5}})
    stamp = (NOW - dt.timedelta(hours=1)).timestamp()
    os.utime(path, (stamp, stamp))
    (version,) = list_versions(tmp_path)
    assert version.age(NOW) == dt.timedelta(hours=1)
    assert version.test_metrics == {"accuracy": 0.5}


def test_only_numeric_directories_are_versions(tmp_path):
    add_version(tmp_path, 1)
    add_version(tmp_path, ".export-2-abc")
    add_version(tmp_path, "tmp")
    (tmp_path / "rollout_history.jsonl").write_text("")
    (tmp_path / "3").write_text("a file, not a version")
    assert [v.version for v in list_versions(tmp_path)] == [1]


def test_an_unreadable_card_is_one_line_naming_it(tmp_path):
    add_version(tmp_path, 1, card("2025-06-01T10:00:00+00:00", 0.9))
    add_version(tmp_path, 2, "{not json")
    with pytest.raises(RepositoryError) as caught:
        list_versions(tmp_path)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "2" / MODEL_CARD))
    assert "unreadable model card" in message
    assert "\n" not in message


def test_a_missing_repository_is_named(tmp_path):
    with pytest.raises(RepositoryError, match=r"absent: cannot list the model's versions"):
        list_versions(tmp_path / "absent")


def test_find_version(tmp_path):
    add_version(tmp_path, 4)
    assert find_version(tmp_path, 4).path == tmp_path / "4"
    with pytest.raises(RepositoryError, match=rf"{tmp_path}: there is no version 5"):
        find_version(tmp_path, 5)


# --- versions_to_retire ------------------------------------------------------------------------


def test_retire_keeps_the_newest_and_the_protected():
    assert versions_to_retire([1, 2, 3, 4, 5, 6], keep=2, protected=[1, 3]) == [2, 4]


def test_retire_with_keep_zero_keeps_only_the_protected():
    assert versions_to_retire([3, 1, 2], keep=0, protected=[2]) == [1, 3]
    assert versions_to_retire([3, 1, 2], keep=0, protected=[]) == [1, 2, 3]


def test_retire_keeping_more_than_there_are_retires_nothing():
    assert versions_to_retire([1, 2], keep=5, protected=[]) == []


def test_retire_protection_from_a_generator_protects_every_version():
    labelled = {"stable": 2, "previous": 1}
    protected = (version for version in labelled.values())
    assert versions_to_retire([1, 2, 3, 4, 5], keep=1, protected=protected) == [3, 4]


def test_retire_refuses_a_negative_keep():
    with pytest.raises(ValueError, match="--keep must be >= 0, got -1"):
        versions_to_retire([1], keep=-1, protected=[])


# --- delete_version ----------------------------------------------------------------------------


def test_delete_version_removes_the_directory_and_leaves_nothing_behind(tmp_path):
    for version in (1, 2, 3):
        add_version(tmp_path, version, card("2025-06-01T10:00:00+00:00", 0.9))
    (tmp_path / "rollout_history.jsonl").write_text("{}\n")
    delete_version(find_version(tmp_path, 2))
    assert sorted(numeric_version_dirs(tmp_path)) == [1, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "3", "rollout_history.jsonl"]
    assert (tmp_path / "1" / "saved_model.pb").read_bytes() == b"graph"


def test_delete_version_renames_the_version_away_before_deleting_anything(tmp_path):
    # rmtree refuses a symbolic link (even to root), so the deletion of a version that is a
    # link stops right after the rename: the version is already out of a server's sight.
    target = add_version(tmp_path / "elsewhere", 7)
    base = tmp_path / "model"
    base.mkdir()
    (base / "7").symlink_to(target, target_is_directory=True)
    assert sorted(numeric_version_dirs(base)) == [7]
    with pytest.raises(RepositoryError, match=r"model/7: cannot retire") as caught:
        delete_version(find_version(base, 7))
    assert "\n" not in str(caught.value)
    assert numeric_version_dirs(base) == {}
    (hidden,) = base.iterdir()
    assert hidden.name.startswith(".retired-7-")
    assert (target / "saved_model.pb").read_bytes() == b"graph"  # nothing deleted
