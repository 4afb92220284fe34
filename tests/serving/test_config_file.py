"""serving/config_file.py: the conditional write of a models.config file that every writer
uses. (The rollout's FileStore is this class; tests/serving/rollout/test_store.py covers its
compare-and-swap and update_config's retries.)"""

from __future__ import annotations

import pytest

from convstack.serving import model_config
from convstack.serving.config_file import (
    ABSENT_REVISION,
    ConfigConflictError,
    ConfigFile,
    ConfigStoreError,
    text_revision,
    update_config,
)
from convstack.serving.rollout.store import FileStore


def one_model(name: str) -> model_config.ModelServerConfig:
    return model_config.single_model_config(name, f"/models/{name}")


def test_a_missing_file_reads_as_empty_only_when_allowed(tmp_path):
    path = tmp_path / "models.config"

    stored = ConfigFile(path, missing_ok=True).read()

    assert stored.config == model_config.ModelServerConfig()
    assert stored.revision == ABSENT_REVISION
    with pytest.raises(ConfigStoreError, match="no such file"):
        ConfigFile(path).read()
    assert not path.exists()


def test_writing_at_the_absent_revision_creates_the_file(tmp_path):
    path = tmp_path / "models.config"

    written = ConfigFile(path, missing_ok=True).write(one_model("a"), ABSENT_REVISION)

    assert model_config.load_model_config(path) == one_model("a")
    assert written.revision == text_revision(path.read_text())


def test_creating_a_file_someone_else_created_meanwhile_conflicts(tmp_path):
    path = tmp_path / "models.config"
    mine = ConfigFile(path, missing_ok=True)
    stale = mine.read()
    ConfigFile(path, missing_ok=True).write(one_model("theirs"), ABSENT_REVISION)

    with pytest.raises(ConfigConflictError, match="changed since it was read"):
        mine.write(one_model("mine"), stale.revision)
    assert model_config.load_model_config(path) == one_model("theirs")


def test_a_file_removed_since_it_was_read_is_not_recreated(tmp_path):
    path = tmp_path / "models.config"
    model_config.write_model_config(path, one_model("a"))
    stale = ConfigFile(path).read()
    path.unlink()

    with pytest.raises(ConfigStoreError, match="no such file"):
        ConfigFile(path, missing_ok=True).write(one_model("b"), stale.revision)
    assert not path.exists()


def test_the_rollout_file_store_and_a_config_file_are_one_writer_path(tmp_path):
    """Both compare-and-swap under the same lock and revision, so an edit through one
    conflicts with a stale write through the other."""
    path = tmp_path / "models.config"
    update_config(ConfigFile(path, missing_ok=True), lambda c: one_model("a"))
    stale = FileStore(path).read()
    update_config(ConfigFile(path), lambda c: model_config.add_model(c, "b", "/models/b"))

    with pytest.raises(ConfigConflictError):
        FileStore(path).write(one_model("c"), stale.revision)
    assert sorted(m.name for m in ConfigFile(path).read().config.model_config_list.config) == [
        "a",
        "b",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".models.config.lock", "models.config"]
