"""Prometheus metrics under TensorFlow Serving's names, so existing dashboards keep working.

TF Serving names its metrics `/tensorflow/serving/...` and exposes them with `/` turned into
`:` (`:tensorflow:serving:request_count`). Its counters carry no `_total` suffix, which
prometheus_client's Counter would add, so counters are exported by a small collector; histograms
use prometheus_client's own (same bucket layout as TF Serving: microseconds, exponential).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from convstack.serving import text_protos

DEFAULT_METRICS_PATH = "/monitoring/prometheus/metrics"

# TF Serving: Buckets::Exponential(10, 1.8, 33) for request/runtime latency (us, ~20 minutes).
LATENCY_BUCKETS_US = tuple(10 * 1.8**i for i in range(33))
# TF Serving's batching session: Exponential(100, 1.2, 52) for queuing latency (us, ~1 s).
QUEUING_BUCKETS_US = tuple(100 * 1.2**i for i in range(52))
BATCH_SIZE_BUCKETS = tuple(2**i for i in range(15))


@dataclass(frozen=True)
class MonitoringConfig:
    """TF Serving's MonitoringConfig: `prometheus_config { enable: true path: "..." }`."""

    enable: bool = False
    path: str = DEFAULT_METRICS_PATH


class MonitoringConfigError(ValueError):
    """The monitoring config file is malformed; the message names the file."""


def parse_monitoring_config(text: str, source: str = "<monitoring_config>") -> MonitoringConfig:
    """Parse a text-format MonitoringConfig with protobuf's parser (serving/text_protos.py), as
    TF Serving reads `--monitoring_config_file`: unknown fields are errors. A path that does not
    start with '/' could never match a request, so it is refused too."""
    try:
        proto = text_protos.parse("MonitoringConfig", text).prometheus_config
    except text_protos.TextProtoError as exc:
        where = source if exc.line is None else f"{source}:{exc.line}"
        raise MonitoringConfigError(f"{where}: {exc.detail}") from None
    path = proto.path or DEFAULT_METRICS_PATH
    if not path.startswith("/"):
        raise MonitoringConfigError(f"{source}: path must start with '/', got {path!r}")
    return MonitoringConfig(proto.enable, path)


def load_monitoring_config(path: str | Path) -> MonitoringConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise MonitoringConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_monitoring_config(text, str(path))


class _CounterFamily:
    """A labelled counter exposed without the `_total` suffix (TF Serving's exposition)."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self._values: Counter[tuple[str, ...]] = Counter()
        self._lock = threading.Lock()

    def inc(self, *label_values: str, amount: float = 1) -> None:
        with self._lock:
            self._values[label_values] += amount

    def value(self, *label_values: str) -> float:
        with self._lock:
            return self._values[label_values]

    def exposition(self) -> str:
        """Text-format lines, written by hand: prometheus_client's writer renames counters
        to `<name>_total` in the TYPE line, which TF Serving's exposition does not do."""
        with self._lock:
            items = sorted(self._values.items())
        lines = [f"# HELP {self.name} {self.documentation}", f"# TYPE {self.name} counter"]
        for label_values, value in items:
            pairs = ",".join(
                f'{key}="{_escape(val)}"'
                for key, val in zip(self.labels, label_values, strict=True)
            )
            lines.append(f"{self.name}{{{pairs}}} {float(value)}" if pairs else
                         f"{self.name} {float(value)}")  # fmt: skip
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ServingMetrics:
    """The server's metrics registry; transports record, `/monitoring/prometheus/metrics`
    renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple, object] = {}
        self.request_count = _CounterFamily(
            ":tensorflow:serving:request_count",
            "The total number of requests.",
            ("model_name", "status"),
        )
        self.wrapped_run_count = _CounterFamily(
            ":tensorflow:serving:batching_session:wrapped_run_count",
            "Total count of run calls on the wrapped session",
            (),
        )
        self.request_latency = self._histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ("model_name", "API", "entrypoint"),
            LATENCY_BUCKETS_US,
        )
        self.runtime_latency = self._histogram(
            ":tensorflow:serving:runtime_latency",
            "Distribution of wall time (in microseconds) for Tensorflow runtime.",
            ("model_name", "API", "runtime"),
            LATENCY_BUCKETS_US,
        )
        self.queuing_latency = self._histogram(
            ":tensorflow:serving:batching_session:queuing_latency",
            "Distribution of wall time spent (in microseconds) in queuing",
            ("thread_pool_name",),
            QUEUING_BUCKETS_US,
        )
        self.input_batch_size = self._histogram(
            ":tensorflow:serving:batching_session:input_batch_size",
            "Tracks the batch size distribution on the inputs by model_name (if available).",
            ("model_name", "op_name"),
            BATCH_SIZE_BUCKETS,
        )
        self.processed_batch_size = self._histogram(
            ":tensorflow:serving:batching_session:processed_batch_size",
            "Tracks the batch size distribution on processing by model_name (if available).",
            ("model_name", "op_name"),
            BATCH_SIZE_BUCKETS,
        )
        self.padding_size = self._histogram(
            ":tensorflow:serving:batching_session:padding_size",
            "Tracks the padding size distribution on batches by model_name (if available).",
            ("model_name", "execution_batch_size"),
            BATCH_SIZE_BUCKETS,
        )

    def _histogram(self, name, documentation, labels, buckets) -> Histogram:
        return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

    def _child(self, histogram: Histogram, *label_values: str):
        """`histogram.labels(...)`, cached: prometheus_client validates the label values on
        every call, which costs as much as the observation itself on the request path."""
        key = (id(histogram), label_values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = histogram.labels(*label_values)
        return child

    def record_request(
        self, model_name: str, api: str, entrypoint: str, status_code: str, seconds: float
    ) -> None:
        """One request: its status (gRPC code name) and its latency in microseconds."""
        self.request_count.inc(model_name, status_code)
        self._child(self.request_latency, model_name, api, entrypoint).observe(seconds * 1e6)

    def record_runtime(self, model_name: str, api: str, seconds: float) -> None:
        self._child(self.runtime_latency, model_name, api, "TF2").observe(seconds * 1e6)

    def record_batch(
        self, model_name: str, size: int, padded_size: int, queue_delays: list[float]
    ) -> None:
        self.wrapped_run_count.inc()
        self._child(self.input_batch_size, model_name, "predict").observe(size)
        self._child(self.processed_batch_size, model_name, "predict").observe(padded_size)
        self._child(self.padding_size, model_name, str(padded_size)).observe(padded_size - size)
        queuing = self._child(self.queuing_latency, "batch_threads")
        for delay in queue_delays:
            queuing.observe(delay * 1e6)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        counters = "".join(c.exposition() for c in (self.request_count, self.wrapped_run_count))
        return counters.encode() + generate_latest(self.registry), CONTENT_TYPE_LATEST
