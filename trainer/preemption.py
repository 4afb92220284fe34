"""SIGTERM handling: Kubernetes preempts a pod with SIGTERM and kills it after a grace period.

The handler is installed when `convstack train` starts and stays for the whole process, so a
SIGTERM in any phase (start-up, data loading, training, evaluation, export) only notes the
request. Each phase stops at its next safe point (`stop_if_requested`): the loop after its
current step chunk and a checkpoint, the others between their steps. The stop raises
`Preempted`, which `convstack train` turns into exit 75, a retryable disruption for the Job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

from convstack.trainer.errors import ERROR_PREFIX, EXIT_PREEMPTED, Preempted

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM,)


class _Request:
    """The one SIGTERM request of this process (signal handlers are process-wide too)."""

    received_at: float | None = None
    signal_name: str = ""
    # (phase, consequence) while the process has nothing to stop cleanly: see exit_at_once.
    immediate: tuple[str, str] | None = None
    handling = False  # inside handling()


def _handle(signum, frame) -> None:
    if _Request.received_at is None:
        _Request.received_at = time.monotonic()
        _Request.signal_name = signal.Signals(signum).name
        if _Request.immediate is not None:
            sys.stderr.write(f"{ERROR_PREFIX} {stop_message(*_Request.immediate)}\n")
            sys.stderr.flush()
            os._exit(EXIT_PREEMPTED)
        log.warning("received %s: stopping at the next safe point", _Request.signal_name)


@contextlib.contextmanager
def exit_at_once(phase: str, consequence: str) -> Iterator[None]:
    """While the block runs, a SIGTERM ends the process at once with exit 75 and its one line.

    For a phase that has written nothing, so has nothing to stop cleanly, and that would hold
    a stop for seconds: importing TensorFlow takes 3-10 s and has no safe point inside.
    """
    stop_if_requested(phase, consequence)
    _Request.immediate = (phase, consequence)
    try:
        yield
    finally:
        _Request.immediate = None


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Note SIGTERM instead of dying of it while the block runs, then restore the previous
    handlers (an in-process caller of `train()` keeps its own SIGTERM behaviour afterwards).

    Outside the main thread, where Python cannot install handlers, it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _handle) for signum in SIGNALS}
    _Request.received_at = None
    _Request.handling = True
    try:
        yield
    finally:
        _Request.handling = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def reclaim() -> None:
    """Take SIGTERM back after TensorFlow took it: MultiWorkerMirroredStrategy's coordination
    service installs its own SIGTERM handler (a preemption notifier that only records the
    time), after which a SIGTERM stopped nothing and the pod ran on until its SIGKILL."""
    if _Request.handling and threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            if signal.getsignal(signum) is not _handle:
                log.info("reinstalling the %s handler", signal.Signals(signum).name)
            signal.signal(signum, _handle)


def requested() -> bool:
    """True once SIGTERM arrived in this process."""
    return _Request.received_at is not None


def seconds_since_request() -> float:
    """How long ago SIGTERM arrived (0 when it did not): the detection time of a stop."""
    if _Request.received_at is None:
        return 0.0
    return time.monotonic() - _Request.received_at


def stop_if_requested(phase: str, consequence: str) -> None:
    """Raise Preempted at a safe point of `phase` if SIGTERM arrived; `consequence` tells the
    operator what a rerun with the same --run-dir will do."""
    if requested():
        raise Preempted(stop_message(phase, consequence))


def stop_message(phase: str, consequence: str) -> str:
    """The one line a preempted run ends with."""
    return (
        f"preempted during {phase} ({_Request.signal_name or 'SIGTERM'} "
        f"{seconds_since_request():.1f}s ago); {consequence}"
    )
