"""The adversarial harness: one embedded server per module serving the tiny exported model, a
tally of every attempt, and the checks each attempt must pass (alive, answered in time, a code
TF Serving would give, the correct request still answered byte for byte).

Hypothesis runs derandomized (the same examples on every run), without shrinking (a failure
reports the example as generated; shrinking against a server costs minutes), and each test
stops attacking once its time budget is spent, so the suite's length is bounded whatever the
machine's load. The budget only ends the attack early; it never decides pass or fail."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.serving.conformance.conftest import MODEL, Server, launch, write_config
from tests.serving.conformance.requests import predict_request
from tests.serving.helpers import make_repository
from tests.serving.memory import MIB, rss_bytes

# A call not answered within this is a hang (the server's own timeouts are all shorter).
CALL_TIMEOUT = 20.0
# What one request may make the server allocate here: 1 MiB (~330 images), so that random
# shapes under the limit still run as small batches on a loaded machine.
TENSOR_LIMIT = 1024 * 1024
REST_BODY_TIMEOUT = 2  # seconds; a body declared longer than sent is a 408 after this
GOLDEN_EVERY = 25  # attempts between checks of the correct request
# RSS may grow by this much plus PER_ATTEMPT per attempt (allocator and cache noise; a leak of
# a request's worth per attempt goes far beyond).
RSS_SLACK = 64 * MIB
RSS_PER_ATTEMPT = 16 * 1024


def attack_settings(max_examples: int) -> settings:
    """Seeded (derandomized), bounded, no shrinking, no per-example deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )


@dataclass
class Tally:
    """What a module's attacks did to the server."""

    module: str
    attempts: int = 0
    crashes: int = 0
    hangs: int = 0
    wrong_codes: int = 0
    golden_checks: int = 0
    rss_before: int = 0
    rss_after: int = 0
    wrong: list[str] = field(default_factory=list)  # the first few, for the report
    codes: Counter = field(default_factory=Counter)  # answers by code: what the attacks reached

    def summary(self) -> dict:
        return {
            "module": self.module,
            "attempts": self.attempts,
            "crashes": self.crashes,
            "hangs": self.hangs,
            "wrong_codes": self.wrong_codes,
            "golden_checks": self.golden_checks,
            "rss_growth_mib": round((self.rss_after - self.rss_before) / MIB, 1),
            "codes": {str(code): count for code, count in sorted(self.codes.items(), key=str)},
            "wrong_examples": self.wrong[:10],
        }


class Budget:
    """A test's attack time: `spent()` once `seconds` have passed since it was made."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def spent(self) -> bool:
        return time.monotonic() >= self._end


@dataclass
class Target:
    """The module's server, its first answer to a correct Predict, and the tally."""

    server: Server
    golden: bytes
    tally: Tally
    model_dir: Path
    config_path: Path

    def alive(self) -> bool:
        return self.server.process.poll() is None

    def record(self, what: str, code: str, allowed: set[str] | frozenset[str]) -> None:
        """Count one attempt that answered `code` ("HANG" if it did not answer in time);
        AssertionError unless the server is alive and `code` is in `allowed`."""
        tally = self.tally
        tally.attempts += 1
        tally.codes[code] += 1
        if not self.alive():
            tally.crashes += 1
            raise AssertionError(f"the server died on {what}:\n{self.server.log()[-3000:]}")
        if code == "HANG":
            tally.hangs += 1
            raise AssertionError(f"no answer within {CALL_TIMEOUT} s to {what}")
        if code not in allowed:
            tally.wrong_codes += 1
            tally.wrong.append(f"{code} for {what[:300]}")
            raise AssertionError(f"{code} (expected one of {sorted(allowed)}) for {what[:2000]}")
        if tally.attempts % GOLDEN_EVERY == 0:
            self.check_golden()

    def check_golden(self) -> None:
        """The correct Predict answers byte for byte as it did before any attack."""
        self.tally.golden_checks += 1
        reply = self.server.prediction().Predict(predict_request(), timeout=CALL_TIMEOUT)
        assert reply.SerializeToString() == self.golden, "the correct request's answer changed"


def grpc_code(error: grpc.RpcError) -> str:
    """The status code name of a failed call; a client-side deadline is a hang."""
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "HANG"
    return code.name


def start_target(root: Path, exported_version: Path, module: str, flags=()) -> Target:
    """Serve the tiny model (version 1) from a models.config the server polls every second."""
    model_dir = make_repository(root / "models", exported_version, [1])
    config = write_config(root / "models.config", [(MODEL, model_dir)])
    monitoring = root / "monitoring.config"
    monitoring.write_text(
        'prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }'
    )
    server = launch(
        root,
        "embedded",
        [
            f"--model_config_file={config}",
            "--model_config_file_poll_wait_seconds=1",
            f"--monitoring_config_file={monitoring}",
            f"--max_request_tensor_bytes={TENSOR_LIMIT}",
            f"--rest_api_body_timeout_seconds={REST_BODY_TIMEOUT}",
            *flags,
        ],
        "server",
    )
    server.wait_available(MODEL)
    golden = server.prediction().Predict(predict_request(), timeout=CALL_TIMEOUT)
    # Warm the request paths up so that RSS is measured from a steady state.
    for _ in range(20):
        server.prediction().Predict(predict_request(), timeout=CALL_TIMEOUT)
    tally = Tally(module, rss_before=rss_bytes(server.process.pid))
    return Target(server, golden.SerializeToString(), tally, model_dir, config)


def finish(target: Target, report_dir: Path, reporter) -> dict:
    """Measure RSS, print the module's one-line summary and save it as JSON."""
    tally = target.tally
    if target.alive():
        tally.rss_after = rss_bytes(target.server.process.pid)
    summary = tally.summary()
    path = report_dir / f"adversarial-{tally.module}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    line = (
        f"adversarial {tally.module}: {tally.attempts} attempts, {tally.crashes} crashes, "
        f"{tally.hangs} hangs, {tally.wrong_codes} wrong codes, RSS "
        f"{summary['rss_growth_mib']:+.1f} MiB ({path})"
    )
    if reporter is not None:
        reporter.write_line(line)
    else:
        print(line)
    return summary


@pytest.fixture(scope="module")
def target(request, exported_version, tmp_path_factory):
    """The module's server; at the end, the summary line and JSON (under pytest's tmp dir)."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    root = tmp_path_factory.mktemp(f"adversarial-{module}")
    target = start_target(root, exported_version, module, getattr(request.module, "FLAGS", ()))
    try:
        yield target
    finally:
        plugins = request.config.pluginmanager
        capture = plugins.get_plugin("capturemanager")
        # Past pytest's output capture, so that the line shows in every run's output.
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            finish(target, tmp_path_factory.getbasetemp(), plugins.get_plugin("terminalreporter"))
        target.server.stop()


def assert_bounded_growth(target: Target) -> None:
    """The module's last check: alive, the correct answer unchanged, RSS growth bounded by a
    generous allowance per attempt."""
    assert target.alive()
    target.check_golden()
    tally = target.tally
    tally.rss_after = rss_bytes(target.server.process.pid)
    growth = tally.rss_after - tally.rss_before
    bound = RSS_SLACK + tally.attempts * RSS_PER_ATTEMPT
    assert growth <= bound, f"RSS grew {growth / MIB:.1f} MiB over {tally.attempts} attempts"
