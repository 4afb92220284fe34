"""The serving error taxonomy. Model management raises these; each transport maps `code` to its
own status (gRPC status code, HTTP status) in one place. Pure: no grpc import here."""

from __future__ import annotations

# gRPC code name -> HTTP status, as TensorFlow Serving's REST API maps them.
HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


class ServingError(Exception):
    """An error with a canonical status code name (`grpc.StatusCode` member names)."""

    code = "UNKNOWN"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


class InvalidArgument(ServingError):
    code = "INVALID_ARGUMENT"


class NotFound(ServingError):
    code = "NOT_FOUND"


class FailedPrecondition(ServingError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServingError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServingError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ServingError):
    code = "DEADLINE_EXCEEDED"


class Unimplemented(ServingError):
    code = "UNIMPLEMENTED"


class Internal(ServingError):
    code = "INTERNAL"


class Cancelled(ServingError):
    code = "CANCELLED"


def error_for_code(code: str, message: str) -> ServingError:
    """A ServingError of the class for `code` (falls back to the base class)."""
    for cls in ServingError.__subclasses__():
        if cls.code == code:
            return cls(message)
    error = ServingError(message)
    error.code = code
    return error


# Requests can carry names of any length; echoed whole into an error they could exceed what a
# transport carries (gRPC's 8 KiB metadata limit turns NOT_FOUND into RESOURCE_EXHAUSTED).
MAX_MESSAGE_CHARS = 2048
_ELISION = "...<{} characters elided>..."


def bounded_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` if it fits in `limit` characters, else its head and tail around a marker."""
    if len(message) <= limit:
        return message
    keep = max(limit - len(_ELISION.format(len(message))), 0)
    head, tail = message[: keep - keep // 4], message[len(message) - keep // 4 :]
    return head + _ELISION.format(len(message) - len(head) - len(tail)) + tail
