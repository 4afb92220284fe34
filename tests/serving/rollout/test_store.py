"""Config stores (serving/rollout/store.py, serving/rollout/grpc_store.py): the file store's
compare-and-swap, update_config's retries, concurrent writers, store URIs, and the grpc: store
against one real embedded server."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from convstack.client.sync_client import PredictionClient
from convstack.serving import model_config
from convstack.serving.process import ServerProcess
from convstack.serving.rollout.configmap_store import ConfigMapStore
from convstack.serving.rollout.grpc_store import GrpcConfigStore
from convstack.serving.rollout.store import (
    ConfigConflictError,
    ConfigStoreError,
    FileStore,
    open_store,
    parse_configmap_address,
    update_config,
)
from tests.serving.helpers import MODEL_NAME, WAIT_SECONDS, config_for, make_model_dir

REPO_ROOT = Path(__file__).resolve().parents[2]


def initial_config() -> model_config.ModelServerConfig:
    return model_config.single_model_config("digits", "/models/digits")


def with_labels(config, specific, **labels):
    config = model_config.set_version_policy(config, "digits", specific=specific)
    return model_config.set_version_labels(config, "digits", labels)


def add_other(name: str):
    """An edit adding model `name` (what a concurrent writer does here)."""

    def edit(config):
        return model_config.add_model(config, name, f"/models/{name}")

    return edit


def model_names(config) -> list[str]:
    return sorted(model.name for model in config.model_config_list.config)


@pytest.fixture
def path(tmp_path) -> Path:
    path = tmp_path / "models.config"
    model_config.write_model_config(path, initial_config())
    return path


@pytest.fixture
def store(path) -> FileStore:
    return FileStore(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- FileStore ---------------------------------------------------------------------------------


def test_read_returns_the_config_and_its_content_hash(store, path):
    stored = store.read()
    assert stored.config == initial_config()
    assert stored.revision == sha256(path)
    assert store.uri == f"file:{path}"


def test_write_replaces_the_file_and_returns_the_new_revision(store, path):
    edited = with_labels(initial_config(), [1, 2], stable=1, canary=2)
    written = store.write(edited, store.read().revision)
    assert written.revision == sha256(path)
    assert store.read() == written
    assert model_config.load_model_config(path) == edited


def test_equal_text_has_equal_revision_whoever_wrote_it(store, path):
    before = store.read().revision
    path.write_text(path.read_text())
    assert store.read().revision == before
    path.write_text(path.read_text() + "\n")
    assert store.read().revision != before


def test_a_write_after_a_concurrent_edit_conflicts_and_keeps_the_other_edit(store, path):
    stale = store.read()
    theirs = add_other("theirs")(stale.config)
    FileStore(path).write(theirs, stale.revision)
    with pytest.raises(ConfigConflictError, match=r"changed since it was read; not written"):
        store.write(with_labels(stale.config, [1], stable=1), stale.revision)
    assert model_config.load_model_config(path) == theirs


def test_a_second_write_with_the_same_revision_conflicts(store):
    stale = store.read()
    store.write(with_labels(stale.config, [1], stable=1), stale.revision)
    with pytest.raises(ConfigConflictError):
        store.write(with_labels(stale.config, [2], stable=2), stale.revision)


def test_an_invalid_config_is_not_written(store, path):
    before = path.read_bytes()
    invalid = model_config.set_version_labels(initial_config(), "digits", {"stable": 1})
    invalid = model_config.set_version_policy(invalid, "digits", specific=[2])
    with pytest.raises(ConfigStoreError, match=r"label 'stable' points at version 1") as caught:
        store.write(invalid, store.read().revision)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(store.uri)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("model_config_list { config { name: 'digits' ", "line 1"),
        ("not a config at all\n", "line 1"),
        ('model_config_list { config { name: "d" base_path: "rel" model_platform: "tensorflow" } }',
         "absolute path"),
        (b"\xff\xfe garbage", "cannot read"),
    ],
)  # fmt: skip
def test_an_invalid_file_is_one_line_naming_it(store, path, text, problem):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigStoreError) as caught:
        store.read()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"file:{path}")
    assert problem in message


def test_a_missing_file_is_named(tmp_path):
    store = FileStore(tmp_path / "absent.config")
    with pytest.raises(ConfigStoreError, match=r"absent\.config: no such file"):
        store.read()
    with pytest.raises(ConfigStoreError, match="no such file"):
        store.write(initial_config(), "0" * 64)
    assert not (tmp_path / "absent.config").exists()


def test_a_store_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    (tmp_path / "a-file").write_text("")
    store = FileStore(tmp_path / "a-file" / "models.config")
    with pytest.raises(ConfigStoreError, match=r"a-file/models\.config: cannot read"):
        store.read()
    with pytest.raises(ConfigStoreError, match=r"a-file/models\.config: cannot write") as caught:
        store.write(initial_config(), "0" * 64)
    assert "\n" not in str(caught.value)


def test_the_lock_file_is_hidden_from_servers(store, path):
    store.write(with_labels(initial_config(), [1], stable=1), store.read().revision)
    # Only the config and a dot-file lock beside it; no temporary file left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == [".models.config.lock", path.name]


# --- update_config -----------------------------------------------------------------------------


class InterferingStore:
    """A FileStore whose next `times` writes each meet a concurrent edit made just before them
    by another writer (through its own FileStore), as another rollout would."""

    def __init__(self, path: Path, times: int) -> None:
        self._store = FileStore(path)
        self._other = FileStore(path)
        self.uri = self._store.uri
        self.times = times
        self.interfered = 0

    def read(self):
        return self._store.read()

    def write(self, config, expected_revision):
        if self.interfered < self.times:
            self.interfered += 1
            update_config(self._other, add_other(f"other{self.interfered}"))
        return self._store.write(config, expected_revision)


def test_update_config_retries_on_the_fresh_config_after_a_conflict(path):
    store = InterferingStore(path, times=1)
    seen = []

    def edit(config):
        seen.append(model_names(config))
        return with_labels(config, [1], stable=1)

    before, after = update_config(store, edit)
    assert seen == [["digits"], ["digits", "other1"]]
    assert model_names(before.config) == ["digits", "other1"]
    on_disk = model_config.load_model_config(path)
    assert on_disk == after.config
    assert model_names(on_disk) == ["digits", "other1"]  # the other edit survived
    assert dict(on_disk.model_config_list.config[0].version_labels) == {"stable": 1}


def test_update_config_gives_up_after_attempts_conflicts_in_a_row(path):
    store = InterferingStore(path, times=100)
    calls = []

    def edit(config):
        calls.append(1)
        return with_labels(config, [1], stable=1)

    with pytest.raises(
        ConfigConflictError, match="changed concurrently 3 times in a row"
    ) as caught:
        update_config(store, edit, attempts=3)
    assert "\n" not in str(caught.value)
    assert len(calls) == 3
    on_disk = model_config.load_model_config(path)
    assert model_names(on_disk) == ["digits", "other1", "other2", "other3"]
    assert not on_disk.model_config_list.config[0].version_labels  # ours never landed


def test_update_config_refuses_an_invalid_edit_without_writing(store, path):
    before = path.read_bytes()

    def edit(config):
        return with_labels(config, [1], stable=1, canary=2)

    with pytest.raises(ConfigStoreError, match="refusing to write an invalid config") as caught:
        update_config(store, edit)
    assert "'canary' points at version 2" in str(caught.value)
    assert path.read_bytes() == before


def test_an_edit_that_raises_stops_the_update(store, path):
    before = path.read_bytes()

    def edit(config):
        raise ValueError("no such version")

    with pytest.raises(ValueError, match="no such version"):
        update_config(store, edit)
    assert path.read_bytes() == before


def test_concurrent_writers_in_threads_all_land(path):
    names = [f"thread{i}" for i in range(8)]
    errors = []

    def writer(name):
        try:
            update_config(FileStore(path), add_other(name), attempts=100)
        except Exception as error:  # reported below; a thread cannot fail the test itself
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert model_names(model_config.load_model_config(path)) == sorted(["digits", *names])


WRITER = textwrap.dedent(
    """
    import sys
    from convstack.serving import model_config
    from convstack.serving.rollout.store import FileStore, update_config

    path, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for i in range(count):
        name = f"{prefix}-{i}"
        update_config(
            FileStore(path),
            lambda config: model_config.add_model(config, name, "/models/" + name),
            attempts=1000,
        )
    """
)


def test_concurrent_writers_in_processes_all_land(path):
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), f"proc{p}", "10"],
            cwd=REPO_ROOT,
            stderr=subprocess.PIPE,
        )
        for p in range(4)
    ]
    for writer in writers:
        _, stderr = writer.communicate(timeout=120)
        assert writer.returncode == 0, stderr.decode()
    expected = ["digits"] + [f"proc{p}-{i}" for p in range(4) for i in range(10)]
    assert model_names(model_config.load_model_config(path)) == sorted(expected)


# --- store URIs --------------------------------------------------------------------------------


def test_open_store_file(tmp_path):
    store = open_store(f"file:{tmp_path}/models.config")
    assert isinstance(store, FileStore)
    assert store.path == tmp_path / "models.config"


def test_open_store_configmap_with_and_without_key():
    store = open_store("configmap:serving/convstack-config")
    assert isinstance(store, ConfigMapStore)
    assert store.uri == "configmap:serving/convstack-config:models.config"
    assert open_store("configmap:ns/name:other.config").uri == "configmap:ns/name:other.config"
    assert parse_configmap_address("ns/name:k", "u") == ("ns", "name", "k")


def test_open_store_grpc(tmp_path):
    store = open_store("grpc:127.0.0.1:8500", grpc_mirror=tmp_path / "mirror.config")
    assert isinstance(store, GrpcConfigStore)
    assert store.uri == "grpc:127.0.0.1:8500"
    assert store.mirror.path == tmp_path / "mirror.config"
    assert open_store("grpc:[::1]:8500", grpc_mirror=tmp_path / "m").target == "[::1]:8500"


def test_the_default_grpc_mirror_is_under_the_state_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    store = open_store("grpc:serving.example:8500")
    assert store.mirror.path == tmp_path / "convstack/grpc-configs/serving.example_8500.config"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models.config", "not a config store"),
        ("file:", "not a config store"),
        ("s3://bucket/models.config", "not a config store"),
        ("configmap:", "not a config store"),
        ("configmap:just-a-name", "expected configmap:NAMESPACE/NAME"),
        ("configmap:/name", "expected configmap:NAMESPACE/NAME"),
        ("configmap:ns/", "expected configmap:NAMESPACE/NAME"),
        ("configmap:ns/a/b", "expected configmap:NAMESPACE/NAME"),
        ("grpc:localhost", "expected grpc:HOST:PORT"),
        ("grpc:localhost:http", "expected grpc:HOST:PORT"),
        ("grpc::8500", "expected grpc:HOST:PORT"),
    ],
)
def test_open_store_rejects_bad_uris_in_one_line(uri, expected, tmp_path):
    with pytest.raises(ConfigStoreError) as caught:
        open_store(uri, grpc_mirror=tmp_path / "mirror")
    message = str(caught.value)
    assert expected in message
    assert repr(uri) in message or f"'{uri}'" in message
    assert "\n" not in message


def test_a_grpc_store_without_mirror_cannot_be_read(tmp_path):
    store = GrpcConfigStore("127.0.0.1:1", mirror=tmp_path / "absent.config")
    with pytest.raises(ConfigStoreError, match="no config pushed from here yet") as caught:
        store.read()
    assert "\n" not in str(caught.value)


def test_a_grpc_store_validates_before_it_pushes(tmp_path):
    # Nothing listens on the target: a push would fail as UNAVAILABLE, so a refusal naming
    # the invalid config shows that the config was checked before any push.
    mirror = tmp_path / "mirror.config"
    model_config.write_model_config(mirror, initial_config())
    store = GrpcConfigStore("127.0.0.1:1", mirror=mirror)
    invalid = with_labels(initial_config(), [1], stable=2)
    with pytest.raises(ConfigStoreError, match="refusing to write an invalid config"):
        store.write(invalid, store.read().revision)
    assert model_config.load_model_config(mirror) == initial_config()


# --- the grpc: store against a real server -----------------------------------------------------


def server_states(target: str) -> dict[int, str]:
    with PredictionClient(target, MODEL_NAME, timeout=10.0) as client:
        return {status["version"]: status["state"] for status in client.status()}


@pytest.mark.slow
def test_grpc_store_pushes_to_a_real_server_and_mirrors_what_it_accepted(tmp_path):
    model_dir = make_model_dir(tmp_path / "models", versions=(1, 2))
    served = config_for(model_dir, specific=[1])
    config_path = tmp_path / "server.config"
    model_config.write_model_config(config_path, served)
    mirror = tmp_path / "mirror.config"
    shutil.copy(config_path, mirror)
    server = ServerProcess.start_with_config(config_path, tmp_path / "server.log")
    try:
        server.wait_available(MODEL_NAME, timeout=WAIT_SECONDS)
        store = open_store(f"grpc:{server.grpc_target}", grpc_mirror=mirror)
        assert store.read().config == served
        assert server_states(server.grpc_target) == {1: "AVAILABLE"}

        def load_both(config):
            return model_config.set_version_policy(config, MODEL_NAME, specific=[1, 2])

        _, after = update_config(store, load_both)
        # The embedded server answers a reload once the aspired versions have settled.
        assert server_states(server.grpc_target) == {2: "AVAILABLE", 1: "AVAILABLE"}
        assert store.read() == after
        assert list(after.config.model_config_list.config[0].model_version_policy
                    .specific.versions) == [1, 2]  # fmt: skip
        assert model_config.load_model_config(config_path) == served  # only pushed, not here

        # Version 3 is not on disk, so a label on it is refused by the server.
        mirrored = mirror.read_bytes()
        refused = config_for(model_dir, specific=[1, 2, 3])
        refused = model_config.set_version_labels(refused, MODEL_NAME, {"canary": 3})
        with pytest.raises(ConfigStoreError, match="the server refused the config") as caught:
            store.write(refused, after.revision)
        assert "FAILED_PRECONDITION" in str(caught.value)
        assert mirror.read_bytes() == mirrored
        assert server_states(server.grpc_target) == {2: "AVAILABLE", 1: "AVAILABLE"}
    finally:
        server.stop()
