"""Named crash points of the export sequence, for its fault-injection test
(tests/trainer/test_export_crashes.py).

With `CONVSTACK_CRASH_AT=<point>` in the environment, the process SIGKILLs itself when it
reaches that point, as an OOM kill or a lost node would stop it: no `finally`, no atexit, no
flushed buffers. Unset (always, outside that test), `reached` is one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "CONVSTACK_CRASH_AT"
# In the order a chief's export passes them (trainer/run.py, then trainer/export.py).
EXPORT_POINTS = (
    "intent-recorded",  # run_dir/export.json names this export's id; nothing staged yet
    "staging-created",  # an empty hidden .export-* directory exists
    "staged",  # the verified version (and its export id) is in the staging directory
    "tree-synced",  # the staging directory is on disk; next comes the rename
    "renamed",  # the version is in place; its directory entry not yet fsynced
    "exported",  # export_version returned; run_dir/export.json not yet marked published
)


def reached(point: str) -> None:
    """SIGKILL this process if the environment asks to crash at `point`."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
