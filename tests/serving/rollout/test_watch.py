"""Watching the servers of a rollout (serving/rollout/watch.py): expanding `--servers` targets
and judging what a replica reports against a rollout step."""

from __future__ import annotations

import threading

import grpc
import pytest

from convstack.common.ports import free_ports
from convstack.serving.rollout.plan import ModelState
from convstack.serving.rollout.watch import (
    ReplicaView,
    VersionFailedError,
    WatchError,
    expand_targets,
    failed_version,
    observe,
    resolve_addresses,
    unmet,
    wait_for_state,
)
from tests.serving.rollout.helpers import ReplicaScript, stand_in_replica

RECORDS = {
    "serving.convstack.svc": ["10.1.0.7", "10.1.0.5", "10.1.0.6"],
    "dual.example": ["fd00::2", "10.1.0.9"],
    "empty.example": [],
}


class Resolver:
    """A DNS of fixed records that remembers what it was asked."""

    def __init__(self, records=RECORDS):
        self.records = records
        self.asked: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        return list(self.records[host])


# --- expand_targets ----------------------------------------------------------------------------


def test_a_dns_target_expands_to_every_address_behind_it():
    resolver = Resolver()
    assert expand_targets(["dns:///serving.convstack.svc:8500"], resolver) == [
        "10.1.0.7:8500",
        "10.1.0.5:8500",
        "10.1.0.6:8500",
    ]
    assert resolver.asked == [("serving.convstack.svc", 8500)]


def test_ipv6_addresses_are_bracketed():
    assert expand_targets(["dns:///dual.example:9000"], Resolver()) == [
        "[fd00::2]:9000",
        "10.1.0.9:9000",
    ]


def test_plain_targets_are_kept_as_given_and_duplicates_dropped():
    targets = [
        "127.0.0.1:8500",
        "dns:///serving.convstack.svc:8500",
        "10.1.0.5:8500",
        "[::1]:8500",
        "127.0.0.1:8500",
        "dns:///serving.convstack.svc:8500",
    ]
    assert expand_targets(targets, Resolver()) == [
        "127.0.0.1:8500",
        "10.1.0.7:8500",
        "10.1.0.5:8500",
        "10.1.0.6:8500",
        "[::1]:8500",
    ]


def test_a_dns_host_in_brackets_is_resolved_without_them():
    resolver = Resolver({"::1": ["::1"]})
    assert expand_targets(["dns:///[::1]:8500"], resolver) == ["[::1]:8500"]
    assert resolver.asked == [("::1", 8500)]


def test_a_name_resolving_to_nothing_is_an_error_naming_it():
    with pytest.raises(WatchError, match=r"'dns:///empty.example:8500'.*resolves to no address"):
        expand_targets(["127.0.0.1:8500", "dns:///empty.example:8500"], Resolver())


@pytest.mark.parametrize(
    "target",
    [
        "localhost",
        "localhost:",
        "localhost:grpc",
        ":8500",
        "dns:///serving.convstack.svc",
        "dns:///:8500",
        "dns:///serving.convstack.svc:port",
        "[]:8500",
    ],
)
def test_malformed_targets_are_one_line_errors_naming_them(target):
    resolver = Resolver()
    with pytest.raises(WatchError) as caught:
        expand_targets([target], resolver)
    message = str(caught.value)
    assert repr(target) in message
    assert "expected HOST:PORT or dns:///HOST:PORT" in message
    assert "\n" not in message
    assert resolver.asked == []


def test_a_dns_target_resolves_through_getaddrinfo():
    expanded = expand_targets(["dns:///localhost:8512"])
    assert "127.0.0.1:8512" in expanded or "[::1]:8512" in expanded
    assert set(expanded) <= {"127.0.0.1:8512", "[::1]:8512"}
    assert resolve_addresses("127.0.0.1", 1) == ["127.0.0.1"]


# --- unmet / failed_version --------------------------------------------------------------------


def view(states=None, labels=None, error="") -> ReplicaView:
    return ReplicaView("10.1.0.5:8500", states or {}, labels or {}, error)


def want(versions, **labels) -> ModelState:
    return ModelState(frozenset(versions), labels)


def test_a_replica_serving_the_step_is_met():
    replica = view({2: ("AVAILABLE", ""), 3: ("AVAILABLE", "")}, {"stable": 2, "canary": 3})
    assert unmet(replica, want({2, 3}, stable=2, canary=3)) is None
    assert failed_version(replica, want({2, 3}, stable=2, canary=3)) is None


def test_finished_unloads_do_not_hold_a_step_back():
    replica = view({1: ("END", ""), 2: ("AVAILABLE", "")}, {"stable": 2})
    assert unmet(replica, want({2}, stable=2)) is None


@pytest.mark.parametrize(
    ("states", "labels", "reason"),
    [
        ({2: ("AVAILABLE", "")}, {"stable": 2}, "version 3 is absent"),
        ({2: ("AVAILABLE", ""), 3: ("LOADING", "")}, {"stable": 2}, "version 3 is LOADING"),
        ({2: ("AVAILABLE", ""), 3: ("START", "")}, {"stable": 2}, "version 3 is START"),
    ],
)
def test_a_wanted_version_not_available_is_unmet(states, labels, reason):
    assert unmet(view(states, labels), want({2, 3}, stable=2)) == reason


def test_a_label_resolving_elsewhere_is_unmet():
    replica = view({2: ("AVAILABLE", ""), 3: ("AVAILABLE", "")}, {"stable": 2, "canary": None})
    assert unmet(replica, want({2, 3}, stable=2, canary=3)) == (
        "label 'canary' resolves to None, not 3"
    )
    replica.labels["canary"] = 2
    assert unmet(replica, want({2, 3}, stable=2, canary=3)) == (
        "label 'canary' resolves to 2, not 3"
    )


@pytest.mark.parametrize("state", ["AVAILABLE", "UNLOADING"])
def test_an_unwanted_version_still_loaded_is_unmet(state):
    replica = view({2: ("AVAILABLE", ""), 3: (state, "")}, {"stable": 2})
    assert unmet(replica, want({2}, stable=2)) == f"version 3 is still {state}"


def test_an_unreachable_replica_is_unmet_with_its_error():
    replica = view(error="UNAVAILABLE: connection refused")
    assert unmet(replica, want({2}, stable=2)) == "UNAVAILABLE: connection refused"
    assert failed_version(replica, want({2}, stable=2)) is None


def test_a_wanted_version_that_ended_with_an_error_has_failed():
    replica = view(
        {2: ("AVAILABLE", ""), 3: ("END", "Could not load: not a SavedModel")}, {"stable": 2}
    )
    assert failed_version(replica, want({2, 3}, stable=2)) == (
        3,
        "Could not load: not a SavedModel",
    )
    assert unmet(replica, want({2, 3}, stable=2)) == "version 3 is END"


def test_an_unwanted_failed_version_or_a_clean_end_is_not_a_failure():
    replica = view({1: ("END", "old failure"), 2: ("END", "")}, {})
    assert failed_version(replica, want({2})) is None  # 2 ended without error: unloaded
    assert failed_version(replica, want({3})) is None  # 1 failed but is not wanted


def test_describe_names_the_target_states_and_labels():
    replica = view({3: ("LOADING", ""), 2: ("AVAILABLE", "")}, {"stable": 2})
    assert replica.describe() == "10.1.0.5:8500: v2 AVAILABLE, v3 LOADING; labels stable->2"
    assert view(error="DEADLINE_EXCEEDED").describe() == "10.1.0.5:8500: DEADLINE_EXCEEDED"
    assert view().describe() == "10.1.0.5:8500: none"


# --- observe / wait_for_state against stand-in replicas ----------------------------------------


@pytest.fixture
def replica():
    script = ReplicaScript({2: ("AVAILABLE", ""), 3: ("LOADING", "")}, {"stable": 2})
    with stand_in_replica(script) as target:
        yield target, script


def test_observe_reports_states_and_where_labels_resolve(replica):
    target, _ = replica
    seen = observe(target, "digits", ["stable", "canary"])
    assert seen.error == ""
    assert seen.states == {2: ("AVAILABLE", ""), 3: ("LOADING", "")}
    assert seen.labels == {"stable": 2, "canary": None}


def test_observe_reports_a_failing_label_lookup_as_the_replicas_error(replica):
    # GetModelStatus answers but GetModelMetadata fails, as when a replica restarts between
    # the two calls: the replica is behind, the watch goes on.
    target, script = replica
    script.metadata_failure = grpc.StatusCode.UNAVAILABLE
    seen = observe(target, "digits", ["stable"])
    assert "UNAVAILABLE" in seen.error
    assert unmet(seen, want({2}, stable=2)) == seen.error


def test_observe_of_an_unreachable_server_is_an_error_not_a_crash():
    (port,) = free_ports(1)
    seen = observe(f"127.0.0.1:{port}", "digits", ["stable"])
    assert "UNAVAILABLE" in seen.error
    assert seen.states == {}


def test_wait_for_state_returns_once_every_replica_serves_the_step(replica):
    target, script = replica
    script.states[3] = ("AVAILABLE", "")
    script.labels["canary"] = 3
    views = wait_for_state([target], "digits", want({2, 3}, stable=2, canary=3), timeout=60)
    assert [v.target for v in views] == [target]


def test_wait_for_state_waits_for_a_replica_to_catch_up(replica):
    target, script = replica

    def finish_loading():
        with script.lock:
            script.states[3] = ("AVAILABLE", "")

    timer = threading.Timer(0.5, finish_loading)
    timer.start()
    try:
        views = wait_for_state([target], "digits", want({2, 3}, stable=2), timeout=120)
    finally:
        timer.cancel()
    assert views[0].states[3] == ("AVAILABLE", "")


def test_wait_for_state_expands_dns_targets(replica):
    target, script = replica
    script.states[3] = ("AVAILABLE", "")
    port = int(target.rpartition(":")[2])
    resolver = Resolver({"replicas.test": ["127.0.0.1"]})
    views = wait_for_state(
        [f"dns:///replicas.test:{port}"], "digits", want({2, 3}), timeout=60, resolve=resolver
    )
    assert [v.target for v in views] == [target]
    assert resolver.asked == [("replicas.test", port)]


def test_wait_for_state_stops_at_once_when_a_wanted_version_fails_to_load(replica):
    target, script = replica
    script.states[3] = ("END", "Could not load: not a SavedModel")
    with pytest.raises(VersionFailedError) as caught:
        wait_for_state([target], "digits", want({2, 3}, stable=2), timeout=600)
    assert caught.value.version == 3
    message = str(caught.value)
    assert message.startswith(f"{target}: version 3 of 'digits' failed to load")
    assert "not a SavedModel" in message


def test_wait_for_state_times_out_naming_the_replicas_behind_and_why(replica):
    target, _ = replica
    (port,) = free_ports(1)
    gone = f"127.0.0.1:{port}"
    with pytest.raises(WatchError) as caught:
        wait_for_state([target, gone], "digits", want({2, 3}, stable=2), timeout=0)
    message = str(caught.value)
    assert f"{target}: version 3 is LOADING" in message
    assert f"{gone}: " in message and "UNAVAILABLE" in message
    assert "\n" not in message
