"""Loopback helpers shared by end-to-end tests: free ports and the embedded server's command
(the same ones the demo and the serving benchmark use)."""

from convstack.common.ports import free_ports
from convstack.serving.process import EMBEDDED_SERVE

__all__ = ["EMBEDDED_SERVE", "free_ports"]
