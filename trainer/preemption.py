"""SIGTERM handling: Kubernetes preempts a pod with SIGTERM and kills it after a grace period,
so the trainer notes the request, finishes the current step chunk, checkpoints and exits."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class PreemptionWatcher:
    """Context manager: `requested` turns True once SIGTERM arrives while it is active.

    Outside the main thread (where Python cannot install handlers) it watches nothing.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self._signals = signals
        self._previous: dict[int, object] = {}
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            log.warning("received %s: checkpointing and stopping", signal.Signals(signum).name)
        self.requested = True

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            for signum in self._signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
