"""Named crash points of a training run, for its fault-injection tests
(tests/trainer/test_export_crashes.py, tests/trainer/test_faults.py).

With `CONVSTACK_CRASH_AT=<point>` in the environment, the process SIGKILLs itself when it
reaches that point, as an OOM kill or a lost node would stop it: no `finally`, no atexit, no
flushed buffers. With `CONVSTACK_CRASH_AT=<point>:SIGTERM` it sends itself SIGTERM there
instead, as a preempting kubelet would, and goes on (the handler notes it; the phase stops at
its next safe point). Unset (always, outside those tests), `reached` is one environment lookup.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "CONVSTACK_CRASH_AT"
# The phases of a run, in order (trainer/cli.py, trainer/run.py).
PHASE_POINTS = (
    "started",  # the SIGTERM handler is installed; TensorFlow not yet imported
    "strategy-created",  # TensorFlow is up and the strategy chosen
    "data-loaded",  # the dataset is loaded; no model yet
    "restored",  # the model is built and the latest checkpoint restored
    # "step-N": after the step chunk that ends at global step N (trainer/run.py)
    "epoch-recorded",  # an epoch's record is in history.json; its checkpoint not yet written
    "trained",  # the last checkpoint is written; test evaluation comes next
    "evaluated",  # test evaluation done; the export comes next
)
# In the order a chief's export passes them (trainer/run.py, then trainer/export.py).
EXPORT_POINTS = (
    "intent-recorded",  # run_dir/export.json names this export's id; nothing staged yet
    "staging-created",  # an empty hidden .export-* directory exists
    "staged",  # the verified version (and its export id) is in the staging directory
    "tree-synced",  # the staging directory is on disk; next comes the rename
    "renamed",  # the version is in place; its directory entry not yet fsynced
    "exported",  # export_version returned; run_dir/export.json not yet marked published
)
_SIGNALS = {"SIGTERM": signal.SIGTERM}


def reached(point: str) -> None:
    """SIGKILL this process (or send it the signal named after a colon) if the environment
    asks for it at `point`."""
    wanted = os.environ.get(ENV)
    if wanted is None:
        return
    name, _, signal_name = wanted.partition(":")
    if name == point:
        os.kill(os.getpid(), _SIGNALS.get(signal_name, signal.SIGKILL))
        _until_noted()


def _until_noted(bound: float = 10.0) -> None:
    """Return once the SIGTERM just sent is noted: the preemption module's waiter thread takes
    it a moment later, and the point's next safe point must see it, as a kubelet's would be
    seen had it come a moment earlier."""
    from convstack.trainer import preemption

    deadline = time.monotonic() + bound
    while not preemption.requested() and time.monotonic() < deadline:
        time.sleep(0.001)


def step_point(step: int) -> str:
    """The crash point after the step chunk ending at global step `step`."""
    return f"step-{step}"
