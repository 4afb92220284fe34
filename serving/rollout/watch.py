"""Watching the servers of a rollout: `--servers` targets (a `dns:///name:port` target expands
to every address behind it, e.g. each replica behind a headless Service), what each replica
reports (version states via GetModelStatus, label resolution via GetModelMetadata), and waiting
until every replica serves a rollout step.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from convstack.client.errors import PredictionError
from convstack.client.sync_client import PredictionClient
from convstack.serving.rollout.plan import ModelState

log = logging.getLogger(__name__)

DNS_SCHEME = "dns:///"
CALL_TIMEOUT_SECONDS = 10.0
POLL_SECONDS = 0.25
# A reachability probe: long enough for a loaded server to answer GetModelStatus, short
# enough that a refusal over several replicas comes back within seconds.
PROBE_TIMEOUT_SECONDS = 5.0
# The codes of a probe that never reached a server answering calls (refused, no route, hung).
UNREACHABLE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


class WatchError(RuntimeError):
    """The servers did not reach a step; one line naming the server and what it reports."""


class ReplicaUnreachableError(WatchError):
    """A replica does not answer at all (nothing listens, it is down or hung): an
    infrastructure fault, never a verdict on a version. `.targets` names the replicas."""

    def __init__(self, message: str, targets: Sequence[str]) -> None:
        super().__init__(message)
        self.targets = list(targets)


class VersionFailedError(WatchError):
    """A version the step needs ended with an error on a server (it failed to load)."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version


def _split_host_port(address: str, server: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host.strip("[]") or not port.isdigit():
        raise WatchError(f"server {server!r}: expected HOST:PORT or dns:///HOST:PORT")
    return host.strip("[]"), int(port)


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def expand_targets(
    servers: Iterable[str], resolve: Callable[[str, int], list[str]] | None = None
) -> list[str]:
    """HOST:PORT targets, with each `dns:///name:port` replaced by all of its addresses
    (sorted, deduplicated); `resolve(host, port)` defaults to getaddrinfo."""
    resolve = resolve or resolve_addresses
    expanded: list[str] = []
    for server in servers:
        if server.startswith(DNS_SCHEME):
            host, port = _split_host_port(server[len(DNS_SCHEME) :], server)
            addresses = resolve(host, port)
            if not addresses:
                raise WatchError(f"server {server!r}: the name resolves to no address")
            expanded += [_join_host_port(address, port) for address in addresses]
        else:
            _split_host_port(server, server)
            expanded.append(server)
    return list(dict.fromkeys(expanded))


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA records), sorted."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise WatchError(f"server dns:///{host}:{port}: cannot resolve: {exc.strerror}") from exc
    return sorted({info[4][0] for info in infos})


@dataclass
class ReplicaView:
    """What one server reports about a model: version -> (state, error message), and
    label -> the version it resolves to (None when the server does not know the label)."""

    target: str
    states: dict[int, tuple[str, str]] = field(default_factory=dict)
    labels: dict[str, int | None] = field(default_factory=dict)
    error: str = ""
    unreachable: bool = False  # the status call got no answer at all (refused, timed out)

    def describe(self) -> str:
        if self.error:
            return f"{self.target}: {self.error}"
        states = ", ".join(f"v{v} {s}" for v, (s, _) in sorted(self.states.items())) or "none"
        labels = ", ".join(f"{k}->{v}" for k, v in sorted(self.labels.items()))
        return f"{self.target}: {states}" + (f"; labels {labels}" if labels else "")


def observe(target: str, model: str, labels: Iterable[str] = ()) -> ReplicaView:
    """Ask one server for the model's version states and where `labels` resolve."""
    view = ReplicaView(target)
    with PredictionClient(target, model, timeout=CALL_TIMEOUT_SECONDS, retries=0) as client:
        try:
            for status in client.status():
                view.states[status["version"]] = (status["state"], status["error_message"])
        except PredictionError as error:
            view.error = str(error)
            view.unreachable = error.code in UNREACHABLE_CODES
            return view
    try:
        for label in labels:
            view.labels[label] = resolved_label(target, model, label)
    except PredictionError as error:
        # A replica restarting between the two calls: behind for now, not a crash.
        view.error = str(error)
    return view


def unreachable_reason(target: str, model: str) -> str | None:
    """Why `target` cannot be reached (the probe's error), or None when it answers
    GetModelStatus, whatever it says about `model` (NOT_FOUND is an answer)."""
    with PredictionClient(target, model, timeout=PROBE_TIMEOUT_SECONDS, retries=0) as client:
        try:
            client.status()
        except PredictionError as error:
            if error.code in UNREACHABLE_CODES:
                return str(error).splitlines()[0]
    return None


def check_reachable(servers: Sequence[str], model: str) -> list[str]:
    """The expanded targets, after probing each one; ReplicaUnreachableError naming every
    replica that does not answer (one line)."""
    targets = expand_targets(servers)
    reasons = {target: unreachable_reason(target, model) for target in targets}
    down = {target: reason for target, reason in reasons.items() if reason}
    if down:
        named = "; ".join(f"replica {target} unreachable ({why})" for target, why in down.items())
        raise ReplicaUnreachableError(named, list(down))
    return targets


def resolved_label(target: str, model: str, label: str) -> int | None:
    """The version `label` resolves to on `target`, None when it resolves to nothing."""
    with PredictionClient(
        target, model, version_label=label, timeout=CALL_TIMEOUT_SECONDS, retries=0
    ) as client:
        try:
            return client.served_version()
        except PredictionError as error:
            if error.code in ("NOT_FOUND", "FAILED_PRECONDITION", "INVALID_ARGUMENT"):
                return None
            raise


def unmet(view: ReplicaView, state: ModelState) -> str | None:
    """Why `view` does not serve `state` yet (None when it does): a wanted version not
    AVAILABLE, a label resolving elsewhere, or an unwanted version still AVAILABLE."""
    if view.error:
        return view.error
    for version in sorted(state.versions):
        current, _ = view.states.get(version, ("absent", ""))
        if current != "AVAILABLE":
            return f"version {version} is {current}"
    for label, version in sorted(state.labels.items()):
        if view.labels.get(label) != version:
            return f"label {label!r} resolves to {view.labels.get(label)}, not {version}"
    for version, (current, _) in sorted(view.states.items()):
        if version not in state.versions and current in ("AVAILABLE", "UNLOADING"):
            return f"version {version} is still {current}"
    return None


def failed_version(view: ReplicaView, state: ModelState) -> tuple[int, str] | None:
    """A wanted version that ended with an error on this server, with the error."""
    for version in sorted(state.versions):
        current, error = view.states.get(version, ("absent", ""))
        if current == "END" and error:
            return version, error
    return None


def _check_unreachable(
    views: Sequence[ReplicaView], down_since: dict[str, float], limit: float | None
) -> None:
    """Note since when each server has not answered; ReplicaUnreachableError naming those
    silent for `limit` seconds (None: never)."""
    now = time.monotonic()
    for view in views:
        if view.unreachable:
            down_since.setdefault(view.target, now)
        else:
            down_since.pop(view.target, None)
    if limit is None:
        return
    gone = [v for v in views if v.unreachable and now - down_since[v.target] >= limit]
    if gone:
        named = "; ".join(
            f"replica {v.target} unreachable for {now - down_since[v.target]:.0f} s "
            f"({v.error.splitlines()[0]})"
            for v in gone
        )
        raise ReplicaUnreachableError(named, [v.target for v in gone])


def wait_for_state(
    servers: Sequence[str],
    model: str,
    state: ModelState,
    timeout: float,
    *,
    resolve: Callable[[str, int], list[str]] | None = None,
    unreachable_after: float | None = None,
) -> list[ReplicaView]:
    """Block until every server (dns:/// targets re-expanded at each poll) serves `state`.
    VersionFailedError as soon as a wanted version fails to load; ReplicaUnreachableError
    once a server has not answered for `unreachable_after` seconds; WatchError after
    `timeout` naming the servers that are behind and why."""
    deadline = time.monotonic() + timeout
    down_since: dict[str, float] = {}
    while True:
        views = [observe(t, model, state.labels) for t in expand_targets(servers, resolve)]
        _check_unreachable(views, down_since, unreachable_after)
        for view in views:
            failure = failed_version(view, state)
            if failure is not None:
                version, error = failure
                raise VersionFailedError(
                    f"{view.target}: version {version} of {model!r} failed to load: {error}",
                    version,
                )
        behind = [(view, unmet(view, state)) for view in views]
        behind = [(view, reason) for view, reason in behind if reason]
        if not behind:
            return views
        if time.monotonic() >= deadline:
            reasons = "; ".join(f"{view.target}: {reason}" for view, reason in behind)
            raise WatchError(f"{model!r} not served as wanted after {timeout:.0f} s: {reasons}")
        time.sleep(POLL_SECONDS)
