"""Channels and calls: TLS, channel options, load balancing, deadlines and retries.

Shared by the sync and the asyncio client. A call's `timeout` is one deadline for the whole
call, retries included: each attempt gets what is left of it, and no retry starts after it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from convstack.client.errors import PredictionError, from_rpc_error

__all__ = [
    "ROUND_ROBIN",
    "ConnectionSettings",
    "RetryPolicy",
    "TlsConfig",
    "call_async",
    "call_sync",
    "deadline_error",
    "open_aio_channel",
    "open_channel",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

ROUND_ROBIN = "round_robin"
# Targets naming a resolver (`dns:///svc:8500`, `ipv4:10.0.0.1:8500,10.0.0.2:8500`) may resolve
# to many servers, e.g. the pods of a headless Service. gRPC's default, pick_first, would send
# every call to one of them; round_robin keeps a connection to each and spreads the calls.
_MULTI_ADDRESS_SCHEMES = ("dns:", "ipv4:", "ipv6:")
# An unanswered keepalive ping this long marks the connection dead (its calls fail UNAVAILABLE
# and are retried on a new one).
_KEEPALIVE_TIMEOUT_MS = 10_000

PemSource = bytes | str | os.PathLike | None


def _read_pem(value: PemSource, what: str) -> bytes | None:
    """PEM bytes as given, PEM text, or the contents of a file path."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"TLS {what}: cannot read {value}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the channel: PEM bytes, PEM text or file paths.

    `root_certificates` verifies the server (None: the system's roots); `certificate_chain` and
    `private_key` together identify the client for mutual TLS; `server_name_override` checks the
    server's certificate against that name instead of the target's host (tests, IP targets).
    """

    root_certificates: PemSource = None
    certificate_chain: PemSource = None
    private_key: PemSource = None
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("TlsConfig: certificate_chain and private_key go together")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.root_certificates, "root_certificates"),
            private_key=_read_pem(self.private_key, "private_key"),
            certificate_chain=_read_pem(self.certificate_chain, "certificate_chain"),
        )

    def channel_options(self) -> list[tuple[str, object]]:
        if self.server_name_override:
            return [("grpc.ssl_target_name_override", self.server_name_override)]
        return []


@dataclass(frozen=True)
class RetryPolicy:
    """Retry `codes` up to `retries` times, sleeping a full-jitter exponential backoff:
    uniform(0, min(cap, base * 2**attempt)) seconds, `backoff` being (base, cap)."""

    retries: int = 3
    backoff: tuple[float, float] = (0.05, 2.0)
    codes: frozenset[str] = frozenset({"UNAVAILABLE"})

    def __post_init__(self) -> None:
        base, cap = self.backoff
        if self.retries < 0 or base <= 0 or cap < base:
            raise ValueError(
                f"retries must be >= 0 and backoff (base, cap) with 0 < base <= cap, got "
                f"retries={self.retries}, backoff={self.backoff}"
            )

    def delay(self, attempt: int, rng: random.Random) -> float:
        base, cap = self.backoff
        return rng.uniform(0.0, min(cap, base * 2.0**attempt))


@dataclass(frozen=True)
class ConnectionSettings:
    """Everything about how a client reaches its server (see PredictionClient for each)."""

    target: str
    timeout: float | None = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    keepalive_seconds: float | None = 30.0
    max_message_bytes: int = 64 * 1024 * 1024
    tls: TlsConfig | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    load_balancing: str | None = None
    options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be positive (or None), got {self.timeout}")
        if self.max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {self.max_message_bytes}")

    def lb_policy(self) -> str | None:
        if self.load_balancing:
            return self.load_balancing
        return ROUND_ROBIN if self.target.startswith(_MULTI_ADDRESS_SCHEMES) else None

    def channel_options(self) -> list[tuple[str, object]]:
        base, cap = self.retry.backoff
        options: list[tuple[str, object]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # gRPC's own reconnect backoff grows to 120 s by default; while it waits, every call
            # fails at once, so retries would be spent before a restarted server is seen again.
            ("grpc.initial_reconnect_backoff_ms", max(100, int(base * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(100, int(cap * 1000))),
        ]
        if self.keepalive_seconds:
            # Pings only while calls are in flight: servers left at gRPC's defaults answer idle
            # pings more often than every 5 minutes with GOAWAY (too_many_pings).
            options += [
                ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
                ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
            ]
        policy = self.lb_policy()
        if policy:
            config = {"loadBalancingConfig": [{policy: {}}]}
            options.append(("grpc.service_config", json.dumps(config)))
        if self.tls:
            options += self.tls.channel_options()
        return options + list(self.options)

    def call_metadata(self, extra: Sequence[tuple[str, str]] = ()) -> tuple | None:
        """The client's metadata plus a call's own; gRPC wants lower-case keys."""
        pairs = tuple((key.lower(), value) for key, value in (*self.metadata, *extra))
        return pairs or None


def open_channel(settings: ConnectionSettings) -> grpc.Channel:
    options = settings.channel_options()
    if settings.tls:
        return grpc.secure_channel(settings.target, settings.tls.credentials(), options)
    return grpc.insecure_channel(settings.target, options)


def open_aio_channel(settings: ConnectionSettings) -> grpc.aio.Channel:
    options = settings.channel_options()
    if settings.tls:
        return grpc.aio.secure_channel(settings.target, settings.tls.credentials(), options)
    return grpc.aio.insecure_channel(settings.target, options)


class _Attempts:
    """The deadline and retry bookkeeping of one call."""

    def __init__(self, settings: ConnectionSettings, timeout: float | None, method: str):
        self.policy = settings.retry
        self.timeout = settings.timeout if timeout is None else timeout
        self.deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self.details = {"method": method, "target": settings.target}
        self.count = 0

    def remaining(self) -> float | None:
        """Seconds left for the next attempt (DEADLINE_EXCEEDED if none are): gRPC itself lets
        a call with a past deadline through when the answer beats its timer."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PredictionError(
                "DEADLINE_EXCEEDED",
                f"Deadline Exceeded (timeout {self.timeout:g} s)",
                {**self.details, "attempts": self.count},
            )
        return left

    def pause_after(self, error: grpc.RpcError, rng: random.Random) -> float:
        """Seconds to wait before retrying `error`; raises it as a PredictionError when it is
        not retryable, retries are used up, or the pause would end after the deadline."""
        self.count += 1
        failure = from_rpc_error(error, **self.details, attempts=self.count)
        if failure.code not in self.policy.codes or self.count > self.policy.retries:
            raise failure
        pause = self.policy.delay(self.count - 1, rng)
        if self.deadline is not None and time.monotonic() + pause >= self.deadline:
            raise failure
        log.debug(
            "%s to %s failed (%s), retry %d of %d in %.3f s",
            self.details["method"],
            self.details["target"],
            failure,
            self.count,
            self.policy.retries,
            pause,
        )
        return pause


def call_sync(
    settings: ConnectionSettings,
    method: str,
    invoke: Callable[..., T],
    request,
    *,
    timeout: float | None,
    metadata: Sequence[tuple[str, str]],
    rng: random.Random,
) -> T:
    """`invoke(request, timeout=..., metadata=...)` with the deadline and retry policy applied;
    every failure leaves as a PredictionError."""
    attempts = _Attempts(settings, timeout, method)
    call_metadata = settings.call_metadata(metadata)
    while True:
        try:
            return invoke(request, timeout=attempts.remaining(), metadata=call_metadata)
        except grpc.RpcError as error:
            time.sleep(attempts.pause_after(error, rng))


async def call_async(
    settings: ConnectionSettings,
    method: str,
    invoke: Callable[..., Awaitable[T]],
    request,
    *,
    timeout: float | None,
    metadata: Sequence[tuple[str, str]],
    rng: random.Random,
) -> T:
    """The asyncio twin of `call_sync`."""
    attempts = _Attempts(settings, timeout, method)
    call_metadata = settings.call_metadata(metadata)
    while True:
        try:
            return await invoke(request, timeout=attempts.remaining(), metadata=call_metadata)
        except grpc.RpcError as error:
            await asyncio.sleep(attempts.pause_after(error, rng))


def deadline_error(what: str, timeout: float, **details: object) -> PredictionError:
    return PredictionError("DEADLINE_EXCEEDED", f"{what} within {timeout:g} s", details)
