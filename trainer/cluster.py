"""The other workers of a multi-worker run: waiting, boundedly, for them to come up, and naming
the one that was lost when a collective fails (issue #19, defects 4 and 5).

Without the wait, a worker whose chief never starts blocks in its first collective (creating
the model's variables) with no end but the Job's activeDeadlineSeconds; without the naming, a
lost peer ends the others with TensorFlow's 80-line traceback.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from convstack.trainer.errors import TrainerError

log = logging.getLogger(__name__)

_TASK_IN_ERROR = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")


class PeerError(TrainerError):
    """A peer was lost; the Job should restart the pods (exit 1)."""


@dataclass(frozen=True)
class Peer:
    task: str  # "worker:1"
    address: str  # "host:port"


def peers(tf_config: str | None, own_task: str) -> list[Peer]:
    """Every task of TF_CONFIG's cluster except `own_task` ("worker:0")."""
    if not tf_config:
        return []
    cluster = json.loads(tf_config).get("cluster", {})
    found = [
        Peer(f"{task_type}:{index}", address)
        for task_type in ("chief", "worker")
        for index, address in enumerate(cluster.get(task_type, []))
    ]
    return [peer for peer in found if peer.task != own_task]


@contextlib.contextmanager
def startup_deadline(found: list[Peer], timeout: float) -> Iterator[None]:
    """Bound the block to `timeout` seconds: log which peers this worker waits for, and end
    the process with exit 1 if the block has not finished by then.

    Nothing in Python can bound it: creating MultiWorkerMirroredStrategy blocks inside
    TensorFlow (its coordination service connecting the tasks) holding the interpreter, so no
    thread, timer or signal handler runs. faulthandler's watchdog is a C thread: it dumps the
    stacks (where it was stuck) and exits 1. Nothing is written before the cluster forms, so
    there is nothing to stop cleanly; a SIGTERM meanwhile waits for the cluster or the deadline.
    """
    missing = [peer for peer in found if not _accepts(peer.address)]
    log.info(
        "joining the cluster: waiting for %s; exiting 1 if it has not formed within "
        "--cluster-wait-seconds %g",
        _names(missing) if missing else f"the cluster to form ({_names(found)})",
        timeout,
    )
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def lost_peer_message(exc: BaseException, found: list[Peer]) -> str:
    """One line for a collective that failed because a peer went away."""
    match = _TASK_IN_ERROR.search(str(exc))
    named = f"{match.group(1)}:{match.group(2)}" if match else None
    if named is not None:
        address = {peer.task: peer.address for peer in found}.get(named)
        lost = f"{named}" + (f" at {address}" if address else "")
    else:
        lost = f"a peer ({_names(found)})" if found else "a peer"
    return (
        f"lost contact with {lost} ({type(exc).__name__}); exiting 1 so that the Job "
        "restarts the pods, which resume from the last checkpoint"
    )


def _accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _names(found: list[Peer]) -> str:
    return ", ".join(f"{peer.task} at {peer.address}" for peer in found)
