"""Prometheus metrics under TensorFlow Serving's names, so existing dashboards keep working.

TF Serving names its metrics `/tensorflow/serving/...` and exposes them with `/` turned into
`:` (`:tensorflow:serving:request_count`). Its counters carry no `_total` suffix, which
prometheus_client's Counter would add, so counters are written by a small family of our own.
Histograms (same bucket layout as TF Serving: microseconds, exponential) are counted here too and
rendered by prometheus_client through its custom-collector interface: its own Histogram takes a
lock per bucket counter and scans the buckets one by one, and a lone batched request's five
observations measured 26 us of its time in the server (against a few us here).

Batches are tallied rather than observed: a batch's five observations depend only on its model,
sizes and how many of its tasks did not wait, so each batch adds one to a count under one lock,
and the counts are folded into the histograms when they are read. At concurrency 1 with
batching on, every request is a batch of its own, and this is the cost batching adds to it.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

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


class _HistogramFamily:
    """A labelled histogram kept as bucket counts and a sum per label set; a prometheus_client
    collector (`collect`), so the library writes its exposition."""

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], bounds: tuple[float, ...]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self._bounds = bounds
        self._le = [floatToGoString(bound) for bound in bounds] + ["+Inf"]
        # Per label set: a count per bucket (the last one +Inf), then the sum.
        self._series: dict[tuple[str, ...], list[float]] = {}
        self._lock = threading.Lock()

    def observe(self, label_values: tuple[str, ...], value: float, times: int = 1) -> None:
        """Count `value` (`times` over) in its bucket: the first whose upper bound is >= value."""
        bucket = bisect.bisect_left(self._bounds, value)
        with self._lock:
            series = self._series.get(label_values)
            if series is None:
                series = self._series[label_values] = [0] * len(self._le) + [0.0]
            series[bucket] += times
            series[-1] += value * times

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        with self._lock:
            snapshot = [(labels, list(series)) for labels, series in self._series.items()]
        for label_values, series in snapshot:
            buckets = list(zip(self._le, itertools.accumulate(series[:-1]), strict=True))
            family.add_metric(list(label_values), buckets, series[-1])
        yield family


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ServingMetrics:
    """The server's metrics registry; transports record, `/monitoring/prometheus/metrics`
    renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        # Batches not yet in the five families above: (model, size, padded size, tasks that
        # did not queue) -> count. Bounded: sizes are at most the largest batch, per model.
        self._batches: Counter[tuple[str, int, int, int]] = Counter()
        self._batches_lock = threading.Lock()

    def _histogram(self, name, documentation, labels, buckets) -> _HistogramFamily:
        family = _HistogramFamily(name, documentation, labels, buckets)
        self.registry.register(family)
        return family

    def record_request(
        self, model_name: str, api: str, entrypoint: str, status_code: str, seconds: float
    ) -> None:
        """One request: its status (gRPC code name) and its latency in microseconds."""
        self.request_count.inc(model_name, status_code)
        self.request_latency.observe((model_name, api, entrypoint), seconds * 1e6)

    def record_runtime(self, model_name: str, api: str, seconds: float) -> None:
        self.runtime_latency.observe((model_name, api, "TF2"), seconds * 1e6)

    def record_batch(
        self, model_name: str, size: int, padded_size: int, queue_delays: Sequence[float]
    ) -> None:
        """One batch run: its real and padded rows, and each task's wait in the queue (s)."""
        waited = [delay for delay in queue_delays if delay > 0] if any(queue_delays) else ()
        with self._batches_lock:
            self._batches[model_name, size, padded_size, len(queue_delays) - len(waited)] += 1
        for delay in waited:
            self.queuing_latency.observe(("batch_threads",), delay * 1e6)

    def _fold_batches(self) -> None:
        """Move the tallied batches into the batching-session families."""
        with self._batches_lock:
            batches, self._batches = self._batches, Counter()
        for (model_name, size, padded_size, unqueued), count in batches.items():
            self.wrapped_run_count.inc(amount=count)
            model = (model_name, "predict")
            self.input_batch_size.observe(model, size, count)
            self.processed_batch_size.observe(model, padded_size, count)
            self.padding_size.observe((model_name, str(padded_size)), padded_size - size, count)
            if unqueued:
                self.queuing_latency.observe(("batch_threads",), 0.0, unqueued * count)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        self._fold_batches()
        counters = "".join(c.exposition() for c in (self.request_count, self.wrapped_run_count))
        return counters.encode() + generate_latest(self.registry), CONTENT_TYPE_LATEST
