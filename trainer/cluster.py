"""The other workers of a multi-worker run: waiting, boundedly, for them to come up, and naming
the one that was lost when a collective fails (issue #19, defects 4 and 5).

Creating MultiWorkerMirroredStrategy connects the tasks through TensorFlow's coordination
service, inside TensorFlow and holding the interpreter (no Python thread, timer or handler runs
meanwhile). Left to its defaults it waits an hour for a task that never starts; so the trainer
configures the service itself first (`bound_cluster_forming`): every task waits at its
registration barrier at most --cluster-wait-seconds, then creating the strategy raises, and the
worker ends with one line naming the tasks that did not join (`not_formed_message`). Without
the naming, a lost peer ends the others with TensorFlow's 80-line traceback.
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
    """A peer was lost, or never joined; the Job should restart the pods (exit 1)."""


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


def bound_cluster_forming(tf_config: str, timeout: float) -> None:
    """Configure TensorFlow's coordination service as MultiWorkerMirroredStrategy would (same
    leader, same coordinated jobs; it keeps a service configured before it), but with every
    task waiting at most `timeout` seconds for all of them to register: past it, creating the
    strategy raises DeadlineExceededError on the leader and on the others alike.

    Must run before TensorFlow's context is initialised (before the strategy is created).
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    cluster_spec = multi_worker_util.normalize_cluster_spec(json.loads(tf_config)["cluster"])
    jobs = [
        coordination_config_pb2.CoordinatedJob(name=job, num_tasks=cluster_spec.num_tasks(job))
        for job in ("chief", "worker")
        if job in cluster_spec.jobs
    ]
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster_spec),
        cluster_register_timeout_in_ms=max(1, round(timeout * 1000)),
        coordinated_jobs=jobs,
    )
    # Not among configure_coordination_service's arguments: the leader, too, waits for every
    # task at registration (else it returns at once and blocks later, without a bound).
    context.context().coordination_service.cluster_register_with_barrier = True


def log_waiting(found: list[Peer], timeout: float) -> None:
    """Say, before the wait, which peers this worker waits for and for how long."""
    missing = [peer for peer in found if not _accepts(peer.address)]
    log.info(
        "joining the cluster: waiting for %s; exiting 1 if it has not formed within "
        "--cluster-wait-seconds %g",
        _names(missing) if missing else f"the cluster to form ({_names(found)})",
        timeout,
    )


def not_formed_message(exc: BaseException, found: list[Peer], timeout: float) -> str:
    """One line for a cluster that did not form in time: the tasks TensorFlow names as not
    registered (on the leader) or unreachable (elsewhere), else those that do not listen."""
    named = {f"{job}:{index}" for job, index in _TASK_IN_ERROR.findall(str(exc))}
    absent = [peer for peer in found if peer.task in named]
    if not absent:
        absent = [peer for peer in found if not _accepts(peer.address)] or found
    return (
        f"the cluster did not form within --cluster-wait-seconds {timeout:g}: no answer from "
        f"{_names(absent)}; exiting 1 so that the Job controller can act"
    )


def joining_output() -> contextlib.AbstractContextManager:
    """Native stderr while joining the cluster: TensorFlow's C++ lines at the usual level when
    verbose, else only fatal ones (a join that fails logs its error several times over, each
    with its gRPC details; the trainer's one line names the absent tasks instead)."""
    from convstack.common.logs import QUIET_TF_LEVEL, native_stderr_filtered, tf_min_level

    level = tf_min_level()
    return native_stderr_filtered(3 if level >= int(QUIET_TF_LEVEL) else level)


@contextlib.contextmanager
def startup_deadline(timeout: float) -> Iterator[None]:
    """A backstop for the rest of the start-up once the cluster formed (loading the data,
    creating and restoring the variables): past `timeout` seconds, dump the stacks (where it
    was stuck) and exit 1.

    A peer lost meanwhile fails the collectives (TensorFlow's heartbeats notice it), which ends
    the run with its one line; this is for a hang nothing else ends. faulthandler's watchdog is
    a C thread, so it fires even while TensorFlow holds the interpreter.
    """
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def lost_peer_message(exc: BaseException, found: list[Peer]) -> str:
    """One line for a collective that failed because a peer went away: the first peer the
    error names (it may name this task first, as the one that reported the failure)."""
    named = {f"{job}:{index}" for job, index in _TASK_IN_ERROR.findall(str(exc))}
    lost_peers = [peer for peer in found if peer.task in named]
    lost = _names(lost_peers) if lost_peers else _unnamed_peer(found)
    return (
        f"lost contact with {lost} ({type(exc).__name__}); exiting 1 so that the Job "
        "restarts the pods, which resume from the last checkpoint"
    )


def _unnamed_peer(found: list[Peer]) -> str:
    return f"a peer ({_names(found)})" if found else "a peer"


def _accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _names(found: list[Peer]) -> str:
    return ", ".join(f"{peer.task} at {peer.address}" for peer in found)
