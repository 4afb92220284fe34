"""The gate decisions of a rollout (serving/rollout/gates.py), on hand-made traffic figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from convstack.serving.rollout.gates import (
    GateResult,
    GateSettings,
    GoldenSet,
    TrafficStats,
    latency_gate,
    quality_gate,
    required_accuracy,
)


def traffic(correct: int, calls: int, latencies=(1.0,), errors=()) -> TrafficStats:
    return TrafficStats(
        correct=correct, calls=calls, errors=list(errors), latencies_ms=list(latencies)
    )


# --- required_accuracy -------------------------------------------------------------------------


def test_absolute_tolerance_subtracts_from_stable():
    settings = GateSettings(tolerance=0.02, tolerance_kind="absolute")
    assert required_accuracy(0.90, settings) == pytest.approx(0.88)


def test_relative_tolerance_is_a_fraction_of_stable():
    settings = GateSettings(tolerance=0.1, tolerance_kind="relative")
    assert required_accuracy(0.80, settings) == pytest.approx(0.72)


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_the_floor_wins_when_it_is_higher(kind):
    settings = GateSettings(tolerance=0.5, tolerance_kind=kind, accuracy_floor=0.7)
    assert required_accuracy(0.9, settings) == 0.7
    assert required_accuracy(None, settings) == 0.7  # no stable: the floor alone


def test_without_stable_and_floor_anything_passes():
    assert required_accuracy(None, GateSettings()) == 0.0


# --- quality_gate ------------------------------------------------------------------------------


def test_quality_passes_within_the_tolerance():
    settings = GateSettings(tolerance=0.05)
    result = quality_gate(traffic(91, 100), traffic(95, 100), settings)
    assert result.passed
    assert result.name == "quality"
    assert result.figures["candidate_accuracy"] == pytest.approx(0.91)
    assert result.figures["stable_accuracy"] == pytest.approx(0.95)
    assert result.figures["required_accuracy"] == pytest.approx(0.90)
    assert result.figures["examples"] == 100
    assert result.figures["failed_calls"] == 0
    assert "0.9100 vs stable 0.9500 on 100 golden examples (needs >= 0.9000)" in result.summary


def test_quality_fails_below_the_tolerance():
    result = quality_gate(traffic(89, 100), traffic(95, 100), GateSettings(tolerance=0.05))
    assert not result.passed
    assert "accuracy 0.8900" in result.summary


def test_quality_at_exactly_the_required_accuracy_passes():
    settings = GateSettings(tolerance=0.0)
    assert quality_gate(traffic(3, 4), traffic(3, 4), settings).passed


def test_quality_fails_below_the_floor_without_stable():
    settings = GateSettings(accuracy_floor=0.8)
    failed = quality_gate(traffic(7, 10), None, settings)
    assert not failed.passed
    assert failed.figures["stable_accuracy"] is None
    assert "vs stable" not in failed.summary
    assert quality_gate(traffic(8, 10), None, settings).passed


def test_quality_fails_on_failed_calls_even_when_accurate_enough():
    candidate = traffic(98, 100, errors=["10.1.0.5:8500: UNAVAILABLE: connection reset", "other"])
    result = quality_gate(candidate, traffic(95, 100), GateSettings())
    assert not result.passed
    assert result.figures["failed_calls"] == 2
    assert "2 calls failed, first: 10.1.0.5:8500: UNAVAILABLE: connection reset" in result.summary


# --- latency_gate ------------------------------------------------------------------------------


def test_latency_passes_within_factor_and_slack():
    settings = GateSettings(latency_factor=2.0, latency_slack_ms=1.0)
    stable = traffic(1, 1, latencies=[4.0] * 100)
    candidate = traffic(1, 1, latencies=[9.0] * 100)  # limit 2 x 4 + 1 = 9
    result = latency_gate(candidate, stable, settings)
    assert result.passed
    assert result.figures["limit_ms"] == pytest.approx(9.0)
    assert result.figures["stable_p99_ms"] == pytest.approx(4.0)
    assert result.figures["candidate_p50_ms"] == pytest.approx(9.0)
    assert "p99 9.00 ms vs stable 4.00 ms (limit 2x + 1 ms = 9.00 ms)" in result.summary


def test_latency_fails_beyond_the_limit():
    settings = GateSettings(latency_factor=2.0, latency_slack_ms=1.0)
    stable = traffic(1, 1, latencies=[4.0] * 100)
    candidate = traffic(1, 1, latencies=[5.0] * 98 + [20.0, 20.0])  # only the tail is slow
    result = latency_gate(candidate, stable, settings)
    assert not result.passed
    assert result.figures["candidate_p99_ms"] == pytest.approx(20.0)
    assert result.figures["candidate_p50_ms"] == pytest.approx(5.0)


def test_latency_passes_without_stable_and_reports_the_candidate():
    result = latency_gate(traffic(1, 1, latencies=[3.0, 5.0]), None, GateSettings())
    assert result.passed
    assert "no stable version to compare" in result.summary
    assert result.figures["candidate_p99_ms"] == pytest.approx(np.percentile([3.0, 5.0], 99))


def test_latency_fails_when_the_candidate_answered_nothing():
    candidate = traffic(0, 5, latencies=[], errors=["e"] * 5)
    result = latency_gate(candidate, traffic(5, 5, latencies=[1.0]), GateSettings())
    assert not result.passed
    assert math.isnan(result.figures["candidate_p99_ms"])


# --- GoldenSet and GateResult ------------------------------------------------------------------


def test_a_golden_set_needs_as_many_labels_as_images():
    images = np.zeros((3, 28, 28, 1), np.float32)
    GoldenSet(images, np.zeros(3, np.int64), "digits")
    with pytest.raises(ValueError, match="golden set digits: 3 images for 2 labels"):
        GoldenSet(images, np.zeros(2, np.int64), "digits")
    with pytest.raises(ValueError, match="0 images for 0 labels; need the same, non-zero"):
        GoldenSet(images[:0], np.zeros(0, np.int64), "digits")


def test_gate_result_line_and_record():
    result = GateResult("latency", False, "p99 too high", {"candidate_p99_ms": 9.5})
    assert result.line() == "latency  FAIL  p99 too high"
    assert GateResult("infra", True, "loaded").line() == "infra    PASS  loaded"
    record = result.as_record()
    assert record == {
        "gate": "latency",
        "passed": False,
        "summary": "p99 too high",
        "figures": {"candidate_p99_ms": 9.5},
    }
    record["figures"]["candidate_p99_ms"] = 0.0  # a copy: the result stays as it was
    assert result.figures["candidate_p99_ms"] == 9.5


def test_traffic_stats_accuracy_of_no_calls_is_zero():
    assert TrafficStats().accuracy == 0.0
    assert math.isnan(TrafficStats().percentile(99))


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        ({"tolerance": -0.1}, "--tolerance"),
        ({"tolerance": 1.0}, "--tolerance"),
        ({"accuracy_floor": 1.5}, "--accuracy-floor"),
        ({"latency_factor": 0}, "--latency-factor"),
        ({"latency_slack_ms": -1}, "--latency-slack-ms"),
        ({"infra_timeout": 0}, "--infra-timeout"),
    ],
)
def test_out_of_range_thresholds_are_refused_naming_the_flag(settings, flag):
    with pytest.raises(ValueError, match=f"^{flag} must be"):
        GateSettings(**settings)
