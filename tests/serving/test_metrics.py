"""Metrics exposition under TF Serving's names, and the monitoring config file."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from convstack.serving.metrics import (
    DEFAULT_METRICS_PATH,
    MonitoringConfigError,
    ServingMetrics,
    parse_monitoring_config,
)


def test_counters_have_tf_serving_names_without_total_suffix():
    metrics = ServingMetrics()
    metrics.record_request("digits", "predict", "GRPC", "OK", 0.002)
    metrics.record_request("digits", "predict", "REST", "OK", 0.001)
    metrics.record_request('we"ird', "predict", "GRPC", "NOT_FOUND", 0.001)
    text = metrics.render()[0].decode()
    assert "# TYPE :tensorflow:serving:request_count counter" in text
    assert ':tensorflow:serving:request_count{model_name="digits",status="OK"} 2.0' in text
    assert r':tensorflow:serving:request_count{model_name="we\"ird",status="NOT_FOUND"} 1.0' in text
    assert "request_count_total" not in text
    # Latency in microseconds: 2 ms lands above the 1000 us bucket boundary.
    assert ':tensorflow:serving:request_latency_count{API="predict",entrypoint="GRPC",' in text


def test_batch_metrics():
    metrics = ServingMetrics()
    metrics.record_batch("digits", size=5, padded_size=8, queue_delays=[0.001, 0.002])
    text = metrics.render()[0].decode()
    assert ":tensorflow:serving:batching_session:wrapped_run_count 1.0" in text
    assert 'processed_batch_size_sum{model_name="digits",op_name="predict"} 8.0' in text
    assert 'input_batch_size_sum{model_name="digits",op_name="predict"} 5.0' in text
    assert 'queuing_latency_count{thread_pool_name="batch_threads"} 2.0' in text


def test_histograms_count_cumulative_buckets_with_bounds_inclusive_and_no_created_series():
    """Bucket `le` holds every observation <= it, +Inf all of them; like TF Serving's exporter
    there is a `_sum` and a `_count` per label set and no `_created` timestamp series."""
    metrics = ServingMetrics()
    for size in (1, 2, 3, 70000):  # 2 is a bucket bound; 70000 is past the last (16384)
        metrics.record_batch("digits", size=size, padded_size=size, queue_delays=[])
    text = metrics.render()[0].decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    name = ":tensorflow:serving:batching_session:input_batch_size"
    labels = (("model_name", "digits"), ("op_name", "predict"))
    for le, count in (("1.0", 1), ("2.0", 2), ("4.0", 3), ("16384.0", 3), ("+Inf", 4)):
        assert samples[(f"{name}_bucket", (("le", le), *labels))] == count, le
    assert samples[(f"{name}_count", labels)] == 4
    assert samples[(f"{name}_sum", labels)] == 70006
    assert "_created" not in text


@pytest.mark.parametrize(
    ("text", "enable", "path"),
    [
        ("", False, DEFAULT_METRICS_PATH),
        ('prometheus_config {\n  enable: true,\n  path: "/metrics"\n}\n', True, "/metrics"),
        ("prometheus_config { enable: true }  # comment", True, DEFAULT_METRICS_PATH),
        ('prometheus_config: { enable: false path: "/m" }', False, "/m"),
        # protobuf text format: angle brackets, adjacent strings, 1 for true.
        ('prometheus_config < enable: 1 path: "/mon" "itoring" >', True, "/monitoring"),
    ],
)
def test_monitoring_config(text, enable, path):
    config = parse_monitoring_config(text)
    assert (config.enable, config.path) == (enable, path)


@pytest.mark.parametrize(
    "text",
    [
        "prometheus_config { enable: maybe }",
        "prometheus_config { colour: true }",
        'prometheus_config { path: "no-slash" }',
        "something_else { }",
    ],
)
def test_bad_monitoring_config_names_the_file(text):
    with pytest.raises(MonitoringConfigError, match=r"mon\.config"):
        parse_monitoring_config(text, "mon.config")


def test_bad_monitoring_config_names_the_line_and_field():
    text = "prometheus_config {\n  enable: true\n  colour: red\n}\n"
    with pytest.raises(MonitoringConfigError) as caught:
        parse_monitoring_config(text, "mon.config")
    message = str(caught.value)
    assert message.startswith("mon.config:3: "), message
    assert 'no field named "colour"' in message


def _samples(metrics: ServingMetrics) -> dict:
    text = metrics.render()[0].decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_batches_keep_counting_across_scrapes_and_tasks_that_did_not_queue_count_as_zero():
    """Batches are tallied and folded into the families when read: a scrape between batches
    must neither lose nor double what came before it, and a task that ran at once is one
    queuing-latency observation of 0 us (the lowest bucket)."""
    metrics = ServingMetrics()
    for _ in range(2):
        metrics.record_batch("digits", size=1, padded_size=1, queue_delays=(0.0,))
    first = _samples(metrics)
    metrics.record_batch("digits", size=1, padded_size=1, queue_delays=(0.0,))
    metrics.record_batch("digits", size=3, padded_size=4, queue_delays=[0.0, 0.0005, 0.002])
    second = _samples(metrics)
    # The parser adds `_total` to counter samples; the exposition has none (test above).
    runs = (":tensorflow:serving:batching_session:wrapped_run_count_total", ())
    sizes = ":tensorflow:serving:batching_session:input_batch_size"
    model = (("model_name", "digits"), ("op_name", "predict"))
    queuing = ":tensorflow:serving:batching_session:queuing_latency"
    pool = (("thread_pool_name", "batch_threads"),)
    assert (first[runs], second[runs]) == (2, 4)
    assert (first[f"{sizes}_sum", model], second[f"{sizes}_sum", model]) == (2, 6)
    assert second[f"{queuing}_count", pool] == 6
    assert second[f"{queuing}_bucket", (("le", "100.0"), *pool)] == 4  # the four zeros
    assert second[f"{queuing}_sum", pool] == pytest.approx(2500)
    padding = (("execution_batch_size", "4"), ("model_name", "digits"))
    assert second[":tensorflow:serving:batching_session:padding_size_sum", padding] == 1
