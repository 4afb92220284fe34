"""SIGTERM handling: Kubernetes preempts a pod with SIGTERM and kills it after a grace period.

`convstack train` installs the handling before anything else (before the flags are parsed and
TensorFlow imported), and it stays for the whole process, so a SIGTERM in any phase (start-up,
data loading, creating the strategy, training, evaluation, export) only notes the request.
Each phase stops at its next safe point (`stop_if_requested`): the loop after its current step
chunk and a checkpoint, the others between their steps. The stop raises `Preempted`, which
`convstack train` turns into exit 75, a retryable disruption for the Job.

The signal is blocked in every thread and taken by a thread of ours that waits for it
(sigwait), not by a handler: TensorFlow installs its own SIGTERM handler when it creates
MultiWorkerMirroredStrategy (its coordination service's preemption notifier, which only records
the time), so a handler-based SIGTERM arriving while the strategy was created was lost. Blocked
from the first line, the signal is blocked in every thread TensorFlow starts afterwards (threads
inherit the mask), and no handler, ours or TensorFlow's, ever runs for it.
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
    """The one SIGTERM request of this process (signal dispositions are process-wide too)."""

    received_at: float | None = None
    signal_name: str = ""
    # (phase, consequence) while the process has nothing to stop cleanly: see exit_at_once.
    immediate: tuple[str, str] | None = None
    handling = False  # inside handling()
    closing = False  # handling() is ending: the waiter's last wake-up is ours


def _note(signum: int) -> None:
    """A SIGTERM arrived: note it (the first one counts), or exit at once in a phase with
    nothing to stop cleanly."""
    if _Request.received_at is not None:
        return
    _Request.received_at = time.monotonic()
    _Request.signal_name = signal.Signals(signum).name
    if _Request.immediate is not None:
        sys.stderr.write(f"{ERROR_PREFIX} {stop_message(*_Request.immediate)}\n")
        sys.stderr.flush()
        os._exit(EXIT_PREEMPTED)
    log.warning("received %s: stopping at the next safe point", _Request.signal_name)


def _handle(signum, frame) -> None:
    """For a thread that does not block the signal (one started before handling())."""
    _note(signum)


def _wait_for_signals() -> None:
    """The waiter thread: takes each blocked SIGTERM (sigwait releases the interpreter)."""
    while True:
        signum = signal.sigwait(SIGNALS)
        if _Request.closing:
            return
        _note(signum)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Note SIGTERM instead of dying of it while the block runs, then restore the signal mask
    and handlers (an in-process caller of `train()` keeps its own SIGTERM behaviour after).

    Outside the main thread, where Python cannot install handlers, it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # Blocked first, then the waiter started: it inherits the mask, as sigwait needs.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    previous = {signum: signal.signal(signum, _handle) for signum in SIGNALS}
    _Request.received_at = None
    _Request.handling, _Request.closing = True, False
    waiter = threading.Thread(target=_wait_for_signals, name="sigterm-waiter", daemon=True)
    waiter.start()
    try:
        yield
    finally:
        _Request.handling, _Request.closing = False, True
        signal.pthread_kill(waiter.ident, SIGNALS[0])  # wakes the waiter, which returns
        waiter.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


@contextlib.contextmanager
def exit_at_once(phase: str, consequence: str) -> Iterator[None]:
    """While the block runs, a SIGTERM ends the process at once with exit 75 and its one line.

    For a phase that has written nothing, so has nothing to stop cleanly, and that would hold
    a stop for seconds: importing TensorFlow takes 3-10 s and has no safe point inside (the
    waiter thread exits as soon as the import lets it run).
    """
    stop_if_requested(phase, consequence)
    _Request.immediate = (phase, consequence)
    try:
        yield
    finally:
        _Request.immediate = None


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
