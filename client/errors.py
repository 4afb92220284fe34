"""The client's one error type, `PredictionError`, and its conversion from gRPC errors.

Everything a client call can fail with arrives as a PredictionError: a status the server sent, a
connection or deadline failure reported by gRPC, or a mistake caught locally before anything is
sent (then the code is INVALID_ARGUMENT, as the server would have answered). Callers branch on
`.code`, a `grpc.StatusCode` name such as "UNAVAILABLE", without importing grpc themselves.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

__all__ = ["PredictionError", "from_rpc_error", "invalid_argument"]

INVALID_ARGUMENT = "INVALID_ARGUMENT"


class PredictionError(Exception):
    """A failed call: `.code` (a grpc.StatusCode name), `.message` (the server's message, or the
    local one naming what was wrong) and `.details` (a dict of context: the input, the method,
    the target, the number of attempts, gRPC's debug string...)."""

    def __init__(self, code: str, message: str, details: Mapping[str, object] | None = None):
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.details = dict(details or {})

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"PredictionError({self.code!r}, {self.message!r})"


def invalid_argument(message: str, **details: object) -> PredictionError:
    """A PredictionError for a request that is wrong before it is sent."""
    return PredictionError(INVALID_ARGUMENT, message, details)


def from_rpc_error(error: grpc.RpcError, **details: object) -> PredictionError:
    """The PredictionError of a failed RPC (sync `grpc.Call` or `grpc.aio.AioRpcError`)."""
    code = error.code() if hasattr(error, "code") else None
    message = error.details() if hasattr(error, "details") else None
    debug = error.debug_error_string() if hasattr(error, "debug_error_string") else None
    if debug:
        details = {**details, "debug_error_string": debug}
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return PredictionError(name, message or str(error), details)
