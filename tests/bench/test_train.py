"""convstack bench train's statistics on synthetic rounds (the benchmark itself trains eight
models: `make bench-train` runs it)."""

from __future__ import annotations

import pytest

from convstack.bench import train


def _record(round_index: int, variant: str, images_per_second: float) -> dict:
    return {
        "round": round_index,
        "variant": variant,
        "used": True,
        "contended": round_index == 0,
        "figures": {"images_per_second": images_per_second},
        "cores": {"other": 0.5 if round_index == 0 else 0.0, "own": 1.0, "watched": {}},
    }


def _described(*names: str) -> dict:
    described = {}
    for name in names:
        loop, replicas, spe = name.split("/")
        described[name] = {
            "loop": loop,
            "replicas": int(replicas[1:]),
            "steps_per_execution": int(spe[3:]),
        }
    return described


def test_custom_over_fit_and_replica_speedups_are_paired_by_round():
    names = ["custom/r1/spe1", "fit/r1/spe1", "custom/r2/spe1", "fit/r2/spe1"]
    speeds = {
        "custom/r1/spe1": [100, 120, 110],
        "fit/r1/spe1": [50, 60, 100],
        "custom/r2/spe1": [200, 240, 220],
        "fit/r2/spe1": [100, 80, 110],
    }
    records = [_record(i, n, v) for n in names for i, v in enumerate(speeds[n])]
    ratios = train._ratios(records, _described(*names), set(names))
    mine = ratios["custom_over_fit_1_replicas_spe1"]
    assert mine["per_round"] == {"median": 2.0, "min": 1.1, "max": 2.0, "n": 3}
    assert mine["of_medians"] == pytest.approx(110 / 60)
    assert ratios["custom_2_over_1_replicas_spe1"]["per_round"]["median"] == pytest.approx(2.0)
    assert set(ratios) == {
        "custom_over_fit_1_replicas_spe1",
        "custom_over_fit_2_replicas_spe1",
        "custom_2_over_1_replicas_spe1",
        "fit_2_over_1_replicas_spe1",
    }


def test_a_variant_that_failed_has_no_ratio_and_its_error_is_printed():
    names = ["custom/r2/spe10", "fit/r2/spe10"]
    records = [_record(i, "custom/r2/spe10", 100.0 + i) for i in range(2)]
    ratios = train._ratios(records, _described(*names), {"custom/r2/spe10"})
    assert ratios == {}
    summary = {"custom/r2/spe10": {"images_per_second": {"median": 100.5, "min": 100.0,
               "max": 101.0, "n": 2}, "contended_rounds": 1, "rounds": 2}}  # fmt: skip
    error = {"loop": "fit", "replicas": 2, "steps_per_execution": 10, "error": "boom"}
    text = train.summary_text({"summary": summary, "errors": [error], "ratios": ratios})
    assert "custom/r2/spe10" in text and "100 [100-101]" in text and "1/2" in text
    assert "fit/r2/spe10: boom" in text
