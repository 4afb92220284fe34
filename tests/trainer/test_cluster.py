"""The one-line messages for a cluster that lost a peer or never formed (pure: no TensorFlow)."""

from __future__ import annotations

import json

from convstack.trainer import cluster

TF_CONFIG = json.dumps(
    {"cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223", "127.0.0.1:2224"]}}
)


def test_peers_are_every_task_but_this_one():
    found = cluster.peers(TF_CONFIG, "worker:1")
    assert [peer.task for peer in found] == ["worker:0", "worker:2"]
    assert found[1].address == "127.0.0.1:2224"
    assert cluster.peers(None, "worker:0") == []


def test_a_lost_peer_is_named_even_when_the_error_names_this_task_first():
    # The chief reports the failure: the error names its own device before the lost peer's.
    error = RuntimeError(
        "Collective ops is aborted by: failed to connect to all addresses on "
        "/job:worker/replica:0/task:0/device:CPU:0 while talking to "
        "/job:worker/replica:0/task:2: Connection refused"
    )
    line = cluster.lost_peer_message(error, cluster.peers(TF_CONFIG, "worker:0"))
    assert line.startswith("lost contact with worker:2 at 127.0.0.1:2224 (RuntimeError);")
    assert "worker:0" not in line


def test_a_lost_peer_the_error_does_not_name_is_one_of_the_peers():
    found = cluster.peers(TF_CONFIG, "worker:0")
    line = cluster.lost_peer_message(RuntimeError("Socket closed"), found)
    assert "lost contact with a peer (worker:1 at 127.0.0.1:2223, worker:2 at" in line
    own_only = RuntimeError("aborted on /job:worker/replica:0/task:0/device:CPU:0")
    assert "a peer (worker:1" in cluster.lost_peer_message(own_only, found)
