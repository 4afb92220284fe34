"""convstack/bench/rounds.py: interleaving, reruns of contended rounds, and the statistics."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from convstack.bench import rounds


def _burn(cpu_seconds: float) -> None:
    """Spin until this process used `cpu_seconds` of CPU (however loaded the machine is)."""
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


def _spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _stop(child: subprocess.Popen) -> None:
    child.kill()
    child.wait()


def test_variants_are_interleaved_and_rotated_round_by_round():
    order = []
    variants = {name: (lambda n=name: order.append(n) or {"x": 1.0}) for name in "abc"}
    records = rounds.run_rounds(variants, 3, contended_cores=float("inf"))
    assert order == list("abcbcacab")
    assert [(r["round"], r["variant"]) for r in records] == [
        (0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"), (2, "c"), (2, "a"), (2, "b"),
    ]  # fmt: skip
    assert all(r["used"] and not r["contended"] for r in records)


def test_a_pair_is_measured_back_to_back_in_every_round_and_swapped_every_other_round():
    orders = [rounds.round_order(list("abcde"), i, [("a", "b")]) for i in range(4)]
    assert orders == [list("abcde"), list("cdeba"), list("deabc"), list("ebacd")]
    # Without the pair, round 1 would put four measurements between a and b.
    assert rounds.rotated(list("abcde"), 1) == list("bcdea")
    order = []
    variants = {name: (lambda n=name: order.append(n) or {"x": 1.0}) for name in "abc"}
    rounds.run_rounds(variants, 2, contended_cores=float("inf"), groups=[("a", "c")])
    assert order == list("acbbca")


def test_a_group_of_three_stays_one_block_rotated_within_each_round():
    orders = ["".join(rounds.round_order(list("abcde"), i, [("a", "c", "e")])) for i in range(3)]
    assert orders == ["acebd", "bdcea", "deacb"]
    for order in orders:  # the three always adjacent, each first once
        assert any(set(order[i : i + 3]) == set("ace") for i in range(3))
    assert {order.lstrip("bd")[0] for order in orders} == set("ace")


@pytest.mark.parametrize(
    "groups",
    [[("a", "a")], [("a",)], [("a", "b"), ("b", "c")], [("a", "z")]],
    ids=["same", "alone", "shared", "unknown"],
)
def test_a_group_must_be_two_or_more_distinct_known_variants_in_no_other_group(groups):
    with pytest.raises(ValueError, match="a group must be two or more distinct variants"):
        rounds.round_order(list("abc"), 0, groups)


def test_own_cpu_counts_as_ours_and_a_watched_process_as_its_own():
    child = _spinner()

    def measure() -> dict:
        _burn(0.2)
        started = rounds.process_cpu_seconds(child.pid)
        while rounds.process_cpu_seconds(child.pid) < started + 0.2:
            time.sleep(0.01)
        return {}

    try:
        records = rounds.run_rounds(
            {"spin": measure}, 1, watch=lambda name: {"server": child.pid}, contended_cores=10.0
        )
    finally:
        _stop(child)
    record = records[0]
    assert record["cpu_seconds"]["own"] >= 0.2
    assert record["cpu_seconds"]["watched"]["server"] >= 0.2
    cores = record["cores"]
    assert cores["machine"] * record["seconds"] >= 0.4 - 0.05  # both, within a tick or two
    assert cores["other"] is not None and cores["other"] >= 0
    assert len(record["load_average"]) == 3


def test_contended_rounds_are_rerun_and_every_attempt_kept():
    hog = _spinner()  # other work, not watched, throughout
    try:
        time.sleep(0.1)
        records = rounds.run_rounds(
            {"a": lambda: time.sleep(0.2) or {"x": 1.0}}, 2, contended_cores=0.0, reruns=2
        )
    finally:
        _stop(hog)
    assert [(r["round"], r["attempt"], r["used"]) for r in records] == [
        (0, 0, False), (0, 1, False), (0, 2, True), (1, 0, False), (1, 1, False), (1, 2, True),
    ]  # fmt: skip
    assert all(r["contended"] and r["cores"]["other"] > 0 for r in records)
    summary = rounds.summarize(records, "a", ["x"])
    assert (summary["rounds"], summary["reruns"], summary["contended_rounds"]) == (2, 4, 2)


def test_an_uncontended_round_is_not_rerun():
    records = rounds.run_rounds({"a": dict}, 1, contended_cores=float("inf"), reruns=3)
    assert [(r["attempt"], r["used"], r["contended"]) for r in records] == [(0, True, False)]


def test_without_reruns_a_contended_round_is_kept_and_counted():
    records = [
        {"round": 0, "variant": "a", "used": True, "contended": True, "figures": {"x": 2.0},
         "cores": {"other": 1.0, "own": 0.5, "watched": {}}},
    ]  # fmt: skip
    summary = rounds.summarize(records, "a", ["x"])
    assert summary["contended_rounds"] == 1 and summary["x"]["median"] == 2.0


def _record(round_index, variant, value, p99):
    return {
        "round": round_index,
        "variant": variant,
        "used": True,
        "contended": False,
        "figures": {"rps": value, "latency_ms": {"p99": p99}},
        "cores": {"other": 0.0, "own": 1.0, "watched": {"server": 0.5}},
    }


def test_summary_gives_median_min_max_and_paired_ratios():
    records = [
        _record(0, "a", 10.0, 1.0), _record(0, "b", 5.0, 2.0),
        _record(1, "a", 30.0, 3.0), _record(1, "b", 10.0, 4.0),
        _record(2, "a", 20.0, 2.0), _record(2, "b", 20.0, 9.0),
    ]  # fmt: skip
    summary = rounds.summarize(records, "a", ["rps", "latency_ms.p99", "missing"])
    assert summary["rps"] == {"median": 20.0, "min": 10.0, "max": 30.0, "n": 3}
    assert summary["latency_ms.p99"]["median"] == 2.0
    assert summary["missing"] == {"median": None, "min": None, "max": None, "n": 0}
    assert summary["server_cores"]["median"] == 0.5
    ratio = rounds.paired_ratio(records, "a", "b", "rps")
    assert ratio["of_medians"] == pytest.approx(2.0)
    assert ratio["per_round"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert ratio["per_round_median_interval"]["low"] == 1.0  # 3 rounds: only the whole range


@pytest.mark.parametrize(
    ("n", "ranks", "coverage"),
    [(5, (1, 5), 0.9375), (6, (1, 6), 0.96875), (10, (2, 9), 0.97852), (20, (6, 15), 0.95861)],
)
def test_median_interval_takes_the_order_statistics_of_the_binomial_table(n, ranks, coverage):
    """The k-th smallest and largest of n values hold the median with the binomial coverage:
    at 95 %, ranks 2 and 9 of 10 and 6 and 15 of 20 (the usual table); under 6 values nothing
    narrower than the whole range reaches 95 %."""
    values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose
    interval = rounds.median_interval(values)
    assert (interval["low"], interval["high"]) == ranks
    assert interval["confidence"] == pytest.approx(coverage, abs=1e-5)
    assert rounds.median_interval([])["low"] is None


def test_spread_of_nothing_and_rounds_must_be_positive():
    assert rounds.spread([None])["n"] == 0
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        rounds.run_rounds({"a": dict}, 0)


def test_cpu_of_a_process_that_is_gone_is_none():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert rounds.process_cpu_seconds(child.pid) is None
    assert rounds.process_cpu_seconds(os.getpid()) >= 0
