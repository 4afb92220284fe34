"""The gates of a rollout, each reported with its figures.

- infra: the candidate loads in a sandbox server of its own (the embedded server, or the real
  TF Serving when installed), replays its warmup requests while loading, and answers a golden
  batch, all within a time limit;
- quality: the candidate's accuracy on the golden set, through the live servers via its label,
  is at least stable's minus a tolerance (absolute or relative) and at least a floor;
- latency: the candidate's p99 on that golden traffic is within a factor of stable's (plus a
  small absolute slack, because sub-millisecond p99s on a shared machine are noisy).

Golden traffic is one example per call, alternating between the routes compared, and spread
over every server, so both routes see the same load and every replica is exercised.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from convstack.client.errors import PredictionError
from convstack.client.sync_client import PredictionClient
from convstack.serving import model_config
from convstack.serving.process import ServerProcess, ServerProcessError

GOLDEN_BATCH = 32
# A version that fails to load in the sandbox fails the gate at once; production servers retry
# (TF Serving: 5 times, a minute apart), which would only delay the verdict here.
SANDBOX_FLAGS = ["--max_num_load_retries=0"]
CALL_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class GateSettings:
    """Thresholds of the gates (the rollout flags of the same names)."""

    tolerance: float = 0.01
    tolerance_kind: Literal["absolute", "relative"] = "absolute"
    accuracy_floor: float = 0.0
    latency_factor: float = 2.0
    latency_slack_ms: float = 2.0
    infra_timeout: float = 180.0

    def __post_init__(self) -> None:
        checks = {
            "--tolerance must be in [0, 1)": 0 <= self.tolerance < 1,
            "--accuracy-floor must be in [0, 1]": 0 <= self.accuracy_floor <= 1,
            "--latency-factor must be > 0": self.latency_factor > 0,
            "--latency-slack-ms must be >= 0": self.latency_slack_ms >= 0,
            "--infra-timeout must be > 0": self.infra_timeout > 0,
        }
        for problem, ok in checks.items():
            if not ok:
                raise ValueError(problem)


@dataclass(frozen=True)
class GoldenSet:
    """Held-out images and their labels, and where they came from."""

    images: np.ndarray
    labels: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels) or len(self.images) == 0:
            raise ValueError(
                f"golden set {self.source}: {len(self.images)} images for "
                f"{len(self.labels)} labels; need the same, non-zero number"
            )


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict and the figures it was decided on."""

    name: str
    passed: bool
    summary: str
    figures: Mapping[str, float | int | str | None] = field(default_factory=dict)

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"{self.name:<8} {verdict}  {self.summary}"

    def as_record(self) -> dict:
        return {
            "gate": self.name,
            "passed": self.passed,
            "summary": self.summary,
            "figures": dict(self.figures),
        }


@dataclass
class TrafficStats:
    """What one route answered on the golden traffic."""

    correct: int = 0
    calls: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    versions: set[int] = field(default_factory=set)
    # (target, gRPC code) of each failed call, for telling a dead replica from a bad version.
    failures: list[tuple[str, str]] = field(default_factory=list)

    def unanswered_targets(self) -> set[str]:
        """Servers with calls that failed without an answer (UNAVAILABLE: nothing listening,
        a connection reset); their reachability decides whose fault those calls were."""
        return {target for target, code in self.failures if code == "UNAVAILABLE"}

    @property
    def accuracy(self) -> float:
        return self.correct / self.calls if self.calls else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


# --- decisions (pure) ----------------------------------------------------------------------


def required_accuracy(stable_accuracy: float | None, settings: GateSettings) -> float:
    """The accuracy a candidate needs: the floor, and stable's minus the tolerance."""
    if stable_accuracy is None:
        return settings.accuracy_floor
    if settings.tolerance_kind == "relative":
        relative = stable_accuracy * (1.0 - settings.tolerance)
        return max(settings.accuracy_floor, relative)
    return max(settings.accuracy_floor, stable_accuracy - settings.tolerance)


def quality_gate(
    candidate: TrafficStats, stable: TrafficStats | None, settings: GateSettings
) -> GateResult:
    """Pass when the candidate answered every call at or above the required accuracy."""
    stable_accuracy = stable.accuracy if stable is not None else None
    needed = required_accuracy(stable_accuracy, settings)
    figures = {
        "candidate_accuracy": candidate.accuracy,
        "stable_accuracy": stable_accuracy,
        "required_accuracy": needed,
        "examples": candidate.calls,
        "failed_calls": len(candidate.errors),
    }
    versus = f" vs stable {stable_accuracy:.4f}" if stable_accuracy is not None else ""
    summary = (
        f"accuracy {candidate.accuracy:.4f}{versus} on {candidate.calls} golden examples "
        f"(needs >= {needed:.4f})"
    )
    if candidate.errors:
        return GateResult(
            "quality",
            False,
            f"{summary}; {len(candidate.errors)} calls failed, first: {candidate.errors[0]}",
            figures,
        )
    return GateResult("quality", candidate.accuracy >= needed, summary, figures)


def latency_gate(
    candidate: TrafficStats, stable: TrafficStats | None, settings: GateSettings
) -> GateResult:
    """Pass when the candidate's p99 <= factor x stable's p99 + slack; skipped without stable."""
    p99 = candidate.percentile(99)
    if stable is None:
        return GateResult(
            "latency",
            True,
            f"p99 {p99:.2f} ms; no stable version to compare",
            {"candidate_p99_ms": p99},
        )
    stable_p99 = stable.percentile(99)
    limit = settings.latency_factor * stable_p99 + settings.latency_slack_ms
    figures = {
        "candidate_p99_ms": p99,
        "stable_p99_ms": stable_p99,
        "limit_ms": limit,
        "candidate_p50_ms": candidate.percentile(50),
        "stable_p50_ms": stable.percentile(50),
    }
    summary = (
        f"p99 {p99:.2f} ms vs stable {stable_p99:.2f} ms (limit {settings.latency_factor:g}x "
        f"+ {settings.latency_slack_ms:g} ms = {limit:.2f} ms)"
    )
    return GateResult("latency", p99 <= limit, summary, figures)


# --- golden traffic ------------------------------------------------------------------------


@contextlib.contextmanager
def _route_clients(
    servers: Sequence[str], model: str, route: Mapping[str, object]
) -> Iterator[list[PredictionClient]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                PredictionClient(target, model, timeout=CALL_TIMEOUT_SECONDS, retries=0, **route)
            )
            for target in servers
        ]


def golden_traffic(
    servers: Sequence[str],
    model: str,
    routes: Mapping[str, Mapping[str, object]],
    golden: GoldenSet,
) -> dict[str, TrafficStats]:
    """Send every golden example, one per call, to each route (e.g. {"canary":
    {"version_label": "canary"}}), alternating routes and servers; per-route stats."""
    stats = {name: TrafficStats() for name in routes}
    with contextlib.ExitStack() as stack:
        clients = {
            name: stack.enter_context(_route_clients(servers, model, route))
            for name, route in routes.items()
        }
        names = list(routes)
        for index in range(len(golden.images)):
            image = golden.images[index : index + 1]
            # Alternate which route goes first, so neither always meets a warmer server.
            order = names if index % 2 == 0 else names[::-1]
            for name in order:
                client = clients[name][index % len(servers)]
                _one_call(client, image, int(golden.labels[index]), stats[name])
    return stats


def _one_call(client: PredictionClient, image: np.ndarray, label: int, stats: TrafficStats):
    started = time.perf_counter()
    try:
        prediction = client.predict(image)
    except PredictionError as error:
        stats.calls += 1
        stats.errors.append(f"{client.target}: {error}")
        stats.failures.append((client.target, error.code))
        return
    stats.latencies_ms.append((time.perf_counter() - started) * 1000.0)
    stats.calls += 1
    stats.correct += int(int(prediction["classes"][0]) == label)
    stats.versions.add(prediction.version)


# --- infra validation ----------------------------------------------------------------------


@dataclass
class Sandbox:
    """A server of its own serving only the candidate version."""

    server: ServerProcess
    target: str
    load_seconds: float


@contextlib.contextmanager
def sandbox(
    model: str, base_path: Path, version: int, timeout: float, backend: str = "auto"
) -> Iterator[Sandbox]:
    """Start a server for `version` alone and wait until it is AVAILABLE (warmup replayed).
    ServerProcessError when it fails to load or exceeds `timeout`."""
    with tempfile.TemporaryDirectory(prefix="convstack-sandbox-") as workdir:
        config_path = Path(workdir) / "models.config"
        config = model_config.add_model(
            model_config.ModelServerConfig(), model, Path(base_path).resolve(), specific=[version]
        )
        model_config.write_model_config(config_path, config)
        started = time.monotonic()
        server = ServerProcess.start_with_config(
            config_path, Path(workdir) / "server.log", SANDBOX_FLAGS, backend=backend
        )
        try:
            _wait_loaded(server, model, version, timeout)
            yield Sandbox(server, server.grpc_target, time.monotonic() - started)
        finally:
            server.stop()


def _wait_loaded(server: ServerProcess, model: str, version: int, timeout: float) -> None:
    """Until `version` is AVAILABLE; ServerProcessError with the reason when it failed to load,
    the server exited (as TF Serving does when its initial load fails) or time ran out."""
    deadline = time.monotonic() + timeout
    with PredictionClient(server.grpc_target, model, timeout=10.0) as client:
        while True:
            if server.process.poll() is not None:
                raise ServerProcessError(
                    f"version {version} did not load: the sandbox server exited with "
                    f"{server.process.returncode}: {_last_error(server)}"
                )
            try:
                client.wait_until_available(version, timeout=1.0)
                return
            except PredictionError as error:
                if error.code not in ("DEADLINE_EXCEEDED", "UNAVAILABLE"):
                    raise ServerProcessError(f"version {version} did not load: {error}") from error
                if time.monotonic() >= deadline:
                    raise ServerProcessError(
                        f"version {version} not AVAILABLE in the sandbox after {timeout:.0f} s"
                    ) from error


def _last_error(server: ServerProcess) -> str:
    """The server log's last ERROR line (what failed), else its last line."""
    lines = [line for line in server.log_tail(200).splitlines() if line.strip()]
    errors = [line for line in lines if " ERROR " in line or "error" in line.lower()]
    return (errors or lines or ["no log"])[-1].strip()


def infra_gate(
    model: str,
    base_path: Path,
    version: int,
    golden: GoldenSet,
    settings: GateSettings,
    backend: str = "auto",
) -> tuple[GateResult, TrafficStats | None]:
    """Load the candidate in a sandbox, answer a golden batch; also the candidate's golden
    traffic there (the quality measure of a first rollout, which has no live label yet)."""
    started = time.monotonic()
    try:
        with sandbox(model, base_path, version, settings.infra_timeout, backend) as box:
            batch_ms = _golden_batch(box.target, model, version, golden)
            stats = golden_traffic(
                [box.target], model, {"candidate": {"version": version}}, golden
            )["candidate"]
    except (ServerProcessError, PredictionError) as error:
        elapsed = time.monotonic() - started
        return GateResult("infra", False, f"{error}".splitlines()[0], {"seconds": elapsed}), None
    figures = {
        "load_seconds": box.load_seconds,
        "golden_batch_ms": batch_ms,
        "golden_batch_size": min(GOLDEN_BATCH, len(golden.images)),
    }
    summary = (
        f"loaded with warmup in {box.load_seconds:.1f} s in a sandbox; a golden batch of "
        f"{figures['golden_batch_size']} answered in {batch_ms:.1f} ms"
    )
    return GateResult("infra", True, summary, figures), stats


def _golden_batch(target: str, model: str, version: int, golden: GoldenSet) -> float:
    images = golden.images[:GOLDEN_BATCH]
    with PredictionClient(target, model, version=version, timeout=CALL_TIMEOUT_SECONDS) as client:
        started = time.perf_counter()
        prediction = client.predict(images)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
    classes = np.asarray(prediction["classes"])
    if classes.shape[0] != len(images):
        raise PredictionError(
            "INTERNAL", f"the golden batch of {len(images)} got {classes.shape[0]} classes back"
        )
    return elapsed_ms
