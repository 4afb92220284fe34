"""A server process's resident memory, for tests that bound what hostile requests make it keep
(not a test module)."""

from __future__ import annotations

from pathlib import Path

MIB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """The resident set size of process `pid` in bytes (psutil when installed, else VmRSS)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return psutil.Process(pid).memory_info().rss
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no VmRSS for process {pid}")
