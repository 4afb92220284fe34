"""The model lifecycle on real exported versions: loads, polls, failures, labels, reloads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from convstack.serving import model_config as mc
from convstack.serving.errors import FailedPrecondition, InvalidArgument, NotFound, ServingError
from convstack.serving.manager import ModelManager, VersionState, VersionStatus
from tests.serving import helpers
from tests.serving.helpers import EventLog, add_corrupt_version, add_version, states, wait_until

IMAGES = np.zeros((1, *helpers.IMAGE_SHAPE), np.float32)


@pytest.fixture
def events() -> EventLog:
    return EventLog()


@pytest.fixture
def make_manager(events):
    """Build managers that scan once at start (tests call poll_once) and stop them afterwards."""
    managers = []

    def make(config, **options) -> ModelManager:
        options = {
            "file_system_poll_wait_seconds": 0,
            "max_num_load_retries": 0,
            "load_retry_interval_seconds": 0,
            "on_event": events,
            **options,
        }
        manager = ModelManager(config, **options)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.stop()


def _served_version(manager, name: str = helpers.MODEL_NAME, **spec) -> int:
    with manager.acquire(name, **spec) as loaded:
        return loaded.version


def test_initial_load_serves_the_latest_version(tmp_path, make_manager):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1, 2))
    manager = make_manager(helpers.config_for(model_dir))

    manager.start()

    assert manager.model_status("tiny") == [VersionStatus(2, VersionState.AVAILABLE)]
    assert _served_version(manager) == 2
    assert manager.all_models_available()
    assert manager.model_names() == ["tiny"]
    with manager.acquire("tiny") as loaded:
        assert loaded.run("", {"images": IMAGES})["classes"].shape == (1,)
    with pytest.raises(NotFound) as caught:
        _served_version(manager, version=1)
    assert caught.value.message == "Servable not found for request: Specific(tiny, 1)"


def test_all_policy_reports_versions_in_descending_order(tmp_path, make_manager):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1, 2, 3))
    manager = make_manager(helpers.config_for(model_dir, all=True))

    manager.start()

    statuses = manager.model_status("tiny")
    assert [s.version for s in statuses] == [3, 2, 1]
    assert {s.state for s in statuses} == {VersionState.AVAILABLE}
    assert {s.error_code for s in statuses} == {"OK"}
    assert manager.model_status("tiny", 2) == [VersionStatus(2, VersionState.AVAILABLE)]
    assert [_served_version(manager, version=v) for v in (1, 2, 3)] == [1, 2, 3]
    assert _served_version(manager) == 3


def test_specific_policy_loads_only_those_versions(tmp_path, make_manager):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1, 2, 3))
    manager = make_manager(helpers.config_for(model_dir, specific=[1, 3]))

    manager.start()

    assert states(manager) == {3: "AVAILABLE", 1: "AVAILABLE"}
    with pytest.raises(NotFound) as caught:
        manager.model_status("tiny", 2)
    assert caught.value.message == "Could not find version 2 of model tiny"


def test_new_version_replaces_the_old_one_without_a_gap(tmp_path, make_manager, events):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1,))
    manager = make_manager(helpers.config_for(model_dir))
    manager.start()
    served, failures, done = set(), [], threading.Event()

    def keep_requesting():
        while not done.is_set():
            try:
                served.add(_served_version(manager))
            except ServingError as exc:
                failures.append(exc)

    requester = threading.Thread(target=keep_requesting)
    requester.start()
    try:
        add_version(model_dir, 2)
        manager.poll_once()
        wait_until(lambda: states(manager) == {2: "AVAILABLE", 1: "END"}, "v2 to replace v1")
    finally:
        done.set()
        requester.join()

    assert failures == []  # the model always had a version to serve
    assert served <= {1, 2}
    assert events.index("tiny version 2 is AVAILABLE") < events.index("Unloading tiny version 1")
    assert _served_version(manager) == 2
    assert manager.model_status("tiny", 1) == [VersionStatus(1, VersionState.END)]


def test_corrupt_version_ends_with_its_error_while_the_previous_one_serves(
    tmp_path, make_manager, events
):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1,))
    manager = make_manager(helpers.config_for(model_dir), max_num_load_retries=2)
    manager.start()

    add_corrupt_version(model_dir, 2)
    manager.poll_once()
    wait_until(lambda: states(manager)[2] == "END", "the corrupt version to fail")

    (failed,) = manager.model_status("tiny", 2)
    assert (failed.state, failed.error_code) == (VersionState.END, "DATA_LOSS")
    assert (
        failed.error_message == f"Can't parse {model_dir / '2' / 'saved_model.pb'} as binary proto"
    )
    assert states(manager) == {2: "END", 1: "AVAILABLE"}
    assert _served_version(manager) == 1
    # One load and two retries, each logged.
    assert events.count("tiny version 2 failed to load (attempt") == 3
    assert events.count("Retrying load of tiny version 2") == 2
    assert events.count("tiny version 2 failed to load after 3 attempt(s) and is END") == 1

    manager.poll_once()  # a failed version is not retried while it stays aspired

    assert manager.model_status("tiny", 2) == [failed]
    assert states(manager)[1] == "AVAILABLE"


def test_a_retry_loads_a_version_repaired_after_a_failed_attempt(tmp_path, make_manager, events):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1,))
    good_proto = (model_dir / "1" / "saved_model.pb").read_bytes()

    def repair_after_first_failure(line: str) -> None:
        events(line)
        if "tiny version 2 failed to load (attempt 1 of 4)" in line:
            (model_dir / "2" / "saved_model.pb").write_bytes(good_proto)

    manager = make_manager(
        helpers.config_for(model_dir), max_num_load_retries=3, on_event=repair_after_first_failure
    )
    manager.start()

    add_corrupt_version(model_dir, 2)
    manager.poll_once()
    wait_until(lambda: states(manager) == {2: "AVAILABLE", 1: "END"}, "the retry to load v2")

    assert events.count("tiny version 2 failed to load (attempt") == 1
    assert events.count("Retrying load of tiny version 2 (retry 1 of 3)") == 1
    assert _served_version(manager) == 2


def test_start_fails_when_a_model_cannot_load(tmp_path, make_manager):
    model_dir = tmp_path / "tiny"
    add_corrupt_version(model_dir, 1)
    manager = make_manager(helpers.config_for(model_dir))

    with pytest.raises(ServingError) as caught:
        manager.start()

    assert caught.value.code == "UNKNOWN"
    assert caught.value.message.startswith("1 servable(s) did not become available: {")
    assert "tiny version 1: DATA_LOSS: Can't parse" in caught.value.message
    assert states(manager) == {1: "END"}


def test_labels_resolve_to_their_versions(tmp_path, make_manager):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1, 2))
    config = helpers.config_for(model_dir, all=True)
    manager = make_manager(config)
    manager.start()

    manager.reload_config(mc.set_version_labels(config, "tiny", {"stable": 1, "canary": 2}))

    assert manager.labels("tiny") == {"stable": 1, "canary": 2}
    assert _served_version(manager, label="stable") == 1
    assert _served_version(manager, label="canary") == 2
    with pytest.raises(InvalidArgument) as caught:
        _served_version(manager, label="nope")
    assert caught.value.message == "Unrecognized servable version label: nope"


def test_label_on_an_unavailable_version_is_refused_and_the_config_kept(tmp_path, make_manager):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1, 2))
    unlabelled = helpers.config_for(model_dir, all=True)
    config = mc.set_version_labels(unlabelled, "tiny", {"stable": 1})
    manager = make_manager(unlabelled)
    manager.start()
    manager.reload_config(config)  # version 1 is AVAILABLE now, so it may carry a label
    strict = make_manager(config)

    with pytest.raises(FailedPrecondition) as caught:
        manager.reload_config(mc.set_version_labels(config, "tiny", {"stable": 3}))

    assert caught.value.message == (
        "Request to assign label to version 3 of model tiny, which is not currently available "
        "for inference"
    )
    assert manager.config == config
    assert manager.labels("tiny") == {"stable": 1}
    assert _served_version(manager, label="stable") == 1
    # Without the flag even the first config may not label a version before it loads.
    with pytest.raises(FailedPrecondition, match="version 1 of model tiny"):
        strict.start()


def test_labels_may_point_ahead_of_a_load_with_the_flag(tmp_path, make_manager):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1,))
    config = mc.set_version_labels(
        helpers.config_for(model_dir, all=True), "tiny", {"stable": 1, "next": 2}
    )
    manager = make_manager(config, allow_version_labels_for_unavailable_models=True)
    manager.start()

    assert _served_version(manager, label="stable") == 1
    with pytest.raises(NotFound) as caught:
        _served_version(manager, label="next")
    assert caught.value.message == "Servable not found for request: Specific(tiny, 2)"

    add_version(model_dir, 2)
    manager.poll_once()
    wait_until(lambda: states(manager).get(2) == "AVAILABLE", "version 2 to load")
    assert _served_version(manager, label="next") == 2
    # The flag never moves an existing label onto a version that cannot serve.
    with pytest.raises(FailedPrecondition, match="version 9 of model tiny"):
        manager.reload_config(mc.set_version_labels(config, "tiny", {"stable": 9}))


def test_reload_config_adds_and_drops_models(tmp_path, make_manager, events):
    first = helpers.make_model_dir(tmp_path, versions=(1,), name="first")
    second = helpers.make_model_dir(tmp_path, versions=(1, 2), name="second")
    config = helpers.config_for(first, name="first")
    manager = make_manager(config)
    manager.start()

    both = mc.add_model(config, "second", second)
    manager.reload_config(both)

    with manager.acquire("second") as loaded:  # loaded before reload_config returned
        assert loaded.version == 2
    assert manager.model_names() == ["first", "second"]

    manager.reload_config(mc.remove_model(both, "first"))

    assert manager.model_names() == ["second"]
    with pytest.raises(NotFound, match=r"Latest\(first\)"):
        _served_version(manager, "first")
    wait_until(lambda: states(manager, "first") == {1: "END"}, "first to unload")
    assert manager.model_status("first") == [VersionStatus(1, VersionState.END)]
    assert manager.all_models_available()
    assert events.count("Removing model first: it is no longer in the config") == 1


def test_reload_config_changes_the_version_policy(tmp_path, make_manager):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1, 2))
    config = helpers.config_for(model_dir)
    manager = make_manager(config)
    manager.start()

    manager.reload_config(mc.set_version_policy(config, "tiny", all=True))
    assert states(manager) == {2: "AVAILABLE", 1: "AVAILABLE"}

    manager.reload_config(mc.set_version_policy(config, "tiny", specific=[1]))
    wait_until(lambda: states(manager) == {2: "END", 1: "AVAILABLE"}, "version 2 to unload")
    assert _served_version(manager) == 1


def test_reload_config_rejects_an_invalid_config(tmp_path, make_manager):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1,))
    config = helpers.config_for(model_dir)
    manager = make_manager(config)
    manager.start()

    with pytest.raises(InvalidArgument, match="absolute path"):
        manager.reload_config(mc.add_model(config, "other", "relative/dir"))

    assert manager.config == config


def test_acquire_blocks_unload_until_released(tmp_path, make_manager, events):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1,))
    manager = make_manager(helpers.config_for(model_dir))
    manager.start()
    holding, release = threading.Event(), threading.Event()
    result = {}

    def slow_request():
        with manager.acquire("tiny") as loaded:
            holding.set()
            release.wait()
            result["version"] = loaded.version
            result["classes"] = loaded.run("", {"images": IMAGES})["classes"]

    request = threading.Thread(target=slow_request)
    request.start()
    holding.wait()
    add_version(model_dir, 2)
    manager.poll_once()
    wait_until(lambda: states(manager) == {2: "AVAILABLE", 1: "UNLOADING"}, "v1 to be unloading")

    assert _served_version(manager) == 2  # new requests go to the new version
    wait_until(lambda: events.count("tiny version 1 waits for 1 in-flight request(s)") == 1, "wait")
    assert states(manager)[1] == "UNLOADING"  # held: it cannot have finished unloading

    release.set()
    request.join()
    wait_until(lambda: states(manager)[1] == "END", "v1 to unload once released")
    assert result["version"] == 1 and result["classes"].shape == (1,)


def test_unknown_models_and_versions(tmp_path, make_manager):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1,))
    manager = make_manager(helpers.config_for(model_dir))
    manager.start()

    with pytest.raises(NotFound) as latest:
        _served_version(manager, "nope")
    with pytest.raises(NotFound) as specific:
        _served_version(manager, version=7)
    with pytest.raises(InvalidArgument, match=r"ModelSpec has no name specified\."):
        _served_version(manager, "")
    with pytest.raises(NotFound) as status:
        manager.model_status("nope")
    with pytest.raises(NotFound) as status_version:
        manager.model_status("tiny", 7)

    assert latest.value.message == "Servable not found for request: Latest(nope)"
    assert specific.value.message == "Servable not found for request: Specific(tiny, 7)"
    assert status.value.message == "Could not find any versions of model nope"
    assert status_version.value.message == "Could not find version 7 of model tiny"
    assert (status.value.code, status.value.http_status) == ("NOT_FOUND", 404)


def test_missing_base_path_leaves_the_model_without_versions(tmp_path, make_manager, events):
    manager = make_manager(helpers.config_for(tmp_path / "missing"))

    manager.start()

    assert not manager.all_models_available()
    assert events.count(f"Could not find base path {tmp_path / 'missing'} for servable tiny") == 1
    with pytest.raises(NotFound, match="Could not find any versions of model tiny"):
        manager.model_status("tiny")


def test_polling_thread_finds_new_versions(tmp_path, make_manager):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1,))
    manager = make_manager(helpers.config_for(model_dir), file_system_poll_wait_seconds=0.05)
    manager.start()

    add_version(model_dir, 2)

    wait_until(lambda: states(manager) == {2: "AVAILABLE", 1: "END"}, "the poll to load v2")


def test_stop_unloads_every_version(tmp_path, make_manager):
    model_dir = helpers.make_model_dir(tmp_path, versions=(1, 2))
    manager = make_manager(helpers.config_for(model_dir, all=True))
    manager.start()

    manager.stop()

    assert states(manager) == {2: "END", 1: "END"}
    with pytest.raises(NotFound):
        _served_version(manager)
