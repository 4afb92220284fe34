"""Free TCP ports on loopback, for servers started on this machine (tests, demo, benchmarks)."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """Ports free on loopback right now (bound, read, released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
