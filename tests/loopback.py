"""Loopback helpers shared by end-to-end tests: free ports and the embedded server's command."""

from __future__ import annotations

import socket
import sys

# `convstack serve` on the embedded backend, bound to loopback only.
EMBEDDED_SERVE = [
    sys.executable, "-m", "convstack.cli", "serve", "--backend=embedded", "--host=127.0.0.1",
]  # fmt: skip


def free_ports(count: int) -> list[int]:
    """Ports free right now on 127.0.0.1 (all held open together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
