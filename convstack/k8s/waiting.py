"""How the k8s commands wait for the cluster: poll until done or until --timeout passes,
logging each change of progress."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO, TypeVar

log = logging.getLogger(__name__)

DEFAULT_POLL_S = 5.0
Result = TypeVar("Result")


@dataclass
class Follow:
    """How a command waits: `timeout` seconds (None: as long as the work runs), polling
    every `poll` seconds, log lines and notes to `out`; `follow` False: not at all."""

    follow: bool = True
    timeout: float | None = None
    poll: float = DEFAULT_POLL_S
    out: TextIO = field(default_factory=lambda: sys.stdout)  # at call time (tests swap it)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


def wait_until(
    follow: Follow, check: Callable[[], tuple[Result | None, str]]
) -> tuple[Result | None, str]:
    """Call `check` every `follow.poll` seconds until it returns a result; it also returns a
    progress line, logged whenever it changes. (None, the last progress line) once
    `follow.timeout` has passed without a result."""
    deadline = None if follow.timeout is None else follow.clock() + follow.timeout
    last = ""
    while True:
        result, progress = check()
        if result is not None:
            return result, progress
        if progress != last:
            log.info("%s", progress)
            last = progress
        if deadline is not None and follow.clock() >= deadline:
            return None, progress
        follow.sleep(follow.poll)
