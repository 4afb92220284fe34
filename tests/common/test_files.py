"""convstack.common.files: the one atomic-write rule (temporary beside, fsync, rename, fsync
the directory) that every published file follows."""

from __future__ import annotations

import json
import os
import stat

import pytest

from convstack.common import files


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_creates_a_readable_file(tmp_path):
    target = tmp_path / "models.config"

    files.write_atomic(target, "model_config_list {}\n")

    assert target.read_text() == "model_config_list {}\n"
    assert _mode(target) == files.NEW_FILE_MODE
    assert os.listdir(tmp_path) == ["models.config"]


def test_write_atomic_replaces_and_keeps_the_mode(tmp_path):
    target = tmp_path / "card.json"
    target.write_bytes(b"old")
    target.chmod(0o600)

    files.write_atomic(target, b"new")

    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "models.config"
    target.write_text("old\n")

    def no_rename(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", no_rename)
    with pytest.raises(OSError, match="No space left"):
        files.write_atomic(target, "new\n")

    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["models.config"]


def test_publish_fsyncs_the_file_then_its_directory(tmp_path, monkeypatch):
    synced = []
    real_open = os.open
    opened = {}

    def recording_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = os.fspath(path)
        return fd

    monkeypatch.setattr(files.os, "open", recording_open)
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(opened[fd]))
    temporary = files.temporary_path(tmp_path / "history.json")
    temporary.write_text("{}")

    files.publish(temporary, tmp_path / "history.json")

    assert synced == [os.fspath(temporary), os.fspath(tmp_path)]
    assert (tmp_path / "history.json").read_text() == "{}"


def test_temporary_names_are_hidden_and_unique(tmp_path):
    names = {files.temporary_path(tmp_path / "a.tfrecord").name for _ in range(50)}

    assert len(names) == 50
    assert all(name.startswith(".a.tfrecord.tmp-") for name in names)


def test_write_json_atomic_creates_the_directory_and_sorts_keys(tmp_path):
    target = tmp_path / "run" / "identity.json"

    files.write_json_atomic(target, {"b": 1, "a": [1, 2]})

    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert target.read_text().index('"a"') < target.read_text().index('"b"')
    assert target.read_text().endswith("}\n")


def test_fsync_tree_reaches_every_file_and_directory(tmp_path, monkeypatch):
    (tmp_path / "variables").mkdir()
    (tmp_path / "variables" / "variables.index").write_bytes(b"x")
    (tmp_path / "saved_model.pb").write_bytes(b"y")
    synced = []
    monkeypatch.setattr(files, "fsync_path", lambda path: synced.append(os.fspath(path)))

    files.fsync_tree(tmp_path)

    expected = {
        str(tmp_path),
        str(tmp_path / "variables"),
        str(tmp_path / "variables" / "variables.index"),
        str(tmp_path / "saved_model.pb"),
    }
    assert set(synced) == expected
