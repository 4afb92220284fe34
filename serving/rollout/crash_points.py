"""Named crash points of a rollout's config writes, for its fault-injection test
(tests/serving/rollout/test_faults.py).

With `CONVSTACK_CRASH_AT=<point>` in the environment (the variable the trainer's crash points
read too), the rollout SIGKILLs itself when it reaches that point, as an OOM kill or a lost
node would stop it: no `finally`, no record after it. Each config write of a verb's step
(`ACTION.STEP`, e.g. `canary.load`, `promote.label`) has two:

- `intent-recorded@ACTION.STEP`: its intent is in the history, the config not yet written;
- `config-written@ACTION.STEP`: the config is written, its outcome not yet recorded.

Unset (always, outside that test), `reached` is one environment lookup. Kept apart from the
trainer's module so that each side's point syntax can change on its own.
"""

from __future__ import annotations

import os
import signal

ENV = "CONVSTACK_CRASH_AT"


def intent_recorded(where: str) -> str:
    """The point after the intent record of the write `where` (ACTION.STEP)."""
    return f"intent-recorded@{where}"


def config_written(where: str) -> str:
    """The point after the config write `where` (ACTION.STEP), before its outcome record."""
    return f"config-written@{where}"


def reached(point: str) -> None:
    """SIGKILL this process if the environment asks to crash at `point`."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
