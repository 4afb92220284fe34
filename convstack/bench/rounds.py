"""Repeated, interleaved measurements with the machine's load beside each one.

A benchmark names its variants (the things it compares) and gives one function per variant that
measures it once and returns its figures (a dict of numbers). `run_rounds` calls them round by
round, the variants' order rotated each round, so that slow drift on a shared machine (other
work starting, thermal changes) falls on every variant alike; variants a ratio compares closely
can be named as a group, measured back to back in every round. Around each call it samples:

* the machine's busy CPU over the call (/proc/stat, in cores: 1.0 = one core busy throughout);
* this process's CPU (`time.process_time`, every thread) and that of watched processes (a server
  under load, /proc/<pid>/stat);
* the load average at the end.

What the machine used beyond this process and the watched ones is `other_cores`: a round where it
exceeds `contended_cores` is flagged `contended` and, with `reruns`, measured again (every attempt
stays in the record; the summary uses each round's last attempt and counts the contended ones it
kept). `summarize` gives each figure's median and min-max over the rounds, `paired_ratio` the
ratio of two variants round by round (both were measured back to back) and of their medians,
with a 95 % interval for the median of the round-by-round ratios (`median_interval`).

Pure statistics apart from the sampling functions at the top; Linux's /proc gives the CPU
figures, elsewhere they are None and no round is flagged.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

__all__ = [
    "DEFAULT_CONTENDED_CORES",
    "Sample",
    "machine_busy_seconds",
    "median_interval",
    "paired_ratio",
    "process_cpu_seconds",
    "round_order",
    "run_rounds",
    "sample",
    "spread",
    "summarize",
]

# Other work using more than this many cores on average during a measurement flags it.
DEFAULT_CONTENDED_CORES = 0.25
_PROC_STAT = Path("/proc/stat")
# /proc/stat's cpu line: user nice system idle iowait irq softirq steal (guest is in user).
_IDLE_FIELDS = (3, 4)


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (None without /proc/stat)."""
    try:
        first = _PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(value) for value in first[1:9]]
    busy = sum(value for i, value in enumerate(ticks) if i not in _IDLE_FIELDS)
    return busy / _clock_ticks()


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (None if it is gone or there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _clock_ticks()


@dataclass(frozen=True)
class Sample:
    """One instant: wall clock, machine busy CPU, own CPU, each watched process's CPU."""

    wall: float
    machine: float | None
    own: float
    watched: Mapping[str, float | None]


def sample(watch: Mapping[str, int] | None = None) -> Sample:
    """The clocks now; `watch` maps a name to a process id."""
    return Sample(
        wall=time.perf_counter(),
        machine=machine_busy_seconds(),
        own=time.process_time(),
        watched={name: process_cpu_seconds(pid) for name, pid in (watch or {}).items()},
    )


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def cpu_between(before: Sample, after: Sample) -> dict:
    """Cores used between two samples: machine, own, each watched process, and other work."""
    wall = max(after.wall - before.wall, 1e-9)
    machine = _delta(after.machine, before.machine)
    own = after.own - before.own
    watched = {
        name: _delta(after.watched.get(name), before.watched[name]) for name in before.watched
    }
    other = None
    if machine is not None and all(value is not None for value in watched.values()):
        other = max(0.0, machine - own - sum(watched.values()))
    cores = {
        "machine": None if machine is None else machine / wall,
        "own": own / wall,
        "watched": {name: None if v is None else v / wall for name, v in watched.items()},
        "other": None if other is None else other / wall,
    }
    return {"seconds": wall, "cpu_seconds": {"own": own, "watched": watched}, "cores": cores}


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def rotated(names: Sequence[T], round_index: int) -> list[T]:
    """The variants' order in a round: shifted by one each round."""
    shift = round_index % len(names) if names else 0
    return list(names[shift:]) + list(names[:shift])


def round_order(
    names: Sequence[str], round_index: int, groups: Sequence[tuple[str, ...]] = ()
) -> list[str]:
    """The variants' order in a round: rotated as `rotated` does, but each group (two or more
    variants) measured back to back: one block in the rotation, itself rotated each round (a
    pair swaps every other round), so a ratio within a group never spans the other variants'
    measurements."""
    group_of: dict[str, tuple[str, ...]] = {}
    for group in groups:
        members = set(group)
        if (
            len(members) < 2
            or len(members) < len(group)
            or members & set(group_of)
            or (not members <= set(names))
        ):
            raise ValueError(
                f"a group must be two or more distinct variants, each in one group: {groups}"
            )
        group_of.update((name, tuple(group)) for name in group)
    blocks: list[tuple[str, ...]] = []
    for name in names:
        if name not in group_of:
            blocks.append((name,))
        elif group_of[name] not in blocks:
            blocks.append(group_of[name])
    return [name for block in rotated(blocks, round_index) for name in rotated(block, round_index)]


def run_rounds(
    variants: Mapping[str, Callable[[], dict]],
    rounds: int,
    *,
    watch: Callable[[str], Mapping[str, int]] | None = None,
    contended_cores: float = DEFAULT_CONTENDED_CORES,
    reruns: int = 0,
    on_round: Callable[[dict], None] | None = None,
    groups: Sequence[tuple[str, ...]] = (),
) -> list[dict]:
    """Measure every variant `rounds` times, interleaved; one record per attempt.

    `variants[name]()` measures once and returns its figures. `watch(name)` gives the processes
    whose CPU belongs to that variant (e.g. its server: {"server": pid}). A contended attempt is
    retried up to `reruns` times. Each of `groups` is measured back to back (see `round_order`).
    Each record: round, variant, attempt, figures, seconds, cores, load_average, contended, and
    `used` (False for an attempt a rerun replaced).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    records: list[dict] = []
    for round_index in range(rounds):
        for name in round_order(list(variants), round_index, groups):
            attempts = []
            for attempt in range(reruns + 1):
                record = _measure_once(
                    variants[name], watch(name) if watch else {}, contended_cores
                )
                record = {"round": round_index, "variant": name, "attempt": attempt, **record}
                attempts.append(record)
                if on_round:
                    on_round(record)
                if not record["contended"]:
                    break
            for record in attempts:
                record["used"] = record is attempts[-1]
            records += attempts
    return records


def _measure_once(measure: Callable[[], dict], watch: Mapping[str, int], limit: float) -> dict:
    before = sample(watch)
    figures = measure()
    after = sample(watch)
    usage = cpu_between(before, after)
    other = usage["cores"]["other"]
    return {
        "figures": figures,
        **usage,
        "load_average": _load_average(),
        "contended": other is not None and other > limit,
    }


def spread(values: Sequence[float | None]) -> dict:
    """Median, min, max and count of the values that are numbers (None when there are none)."""
    numbers = [float(v) for v in values if v is not None]
    if not numbers:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": statistics.median(numbers),
        "min": min(numbers),
        "max": max(numbers),
        "n": len(numbers),
    }


def median_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """A distribution-free interval for the median of `values`: the k-th smallest and k-th
    largest, with the largest k whose coverage (from the binomial distribution of how many
    values fall below the median) is at least `confidence`. With too few values for that
    (under 6 at 95 %), the whole range, with the coverage it has."""
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return {"low": None, "high": None, "confidence": None}
    k, coverage = 1, 1 - 2 * 0.5**n  # [min, max] misses only if every value is on one side
    while k < n // 2:
        wider = 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) * 0.5**n
        if wider < confidence:
            break
        k, coverage = k + 1, wider
    return {"low": ordered[k - 1], "high": ordered[n - k], "confidence": coverage}


def used(records: Sequence[dict], variant: str) -> list[dict]:
    """The records of a variant the summary counts (each round's last attempt), by round."""
    chosen = [r for r in records if r["variant"] == variant and r.get("used", True)]
    return sorted(chosen, key=lambda r: r["round"])


def figure(record: dict, key: str) -> float | None:
    """A figure of a record; a dotted key reaches into nested dicts ("latency_ms.p99")."""
    value = record["figures"]
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, int | float) else None


def summarize(records: Sequence[dict], variant: str, keys: Sequence[str]) -> dict:
    """Each figure's spread over the variant's rounds, the per-watched-process CPU cores, and
    how many of the rounds counted were contended."""
    chosen = used(records, variant)
    summary = {key: spread([figure(r, key) for r in chosen]) for key in keys}
    summary["other_cores"] = spread([r["cores"]["other"] for r in chosen])
    summary["own_cores"] = spread([r["cores"]["own"] for r in chosen])
    watched = sorted({name for r in chosen for name in r["cores"]["watched"]})
    for name in watched:
        summary[f"{name}_cores"] = spread([r["cores"]["watched"].get(name) for r in chosen])
    summary["rounds"] = len(chosen)
    summary["contended_rounds"] = sum(1 for r in chosen if r["contended"])
    summary["reruns"] = sum(1 for r in records if r["variant"] == variant and not r["used"])
    return summary


def paired_ratio(records: Sequence[dict], numerator: str, denominator: str, key: str) -> dict:
    """numerator/denominator of one figure: per round (both measured in that round) as a
    spread, and the ratio of the two medians."""
    top = {r["round"]: figure(r, key) for r in used(records, numerator)}
    bottom = {r["round"]: figure(r, key) for r in used(records, denominator)}
    per_round = [
        top[i] / bottom[i]
        for i in sorted(set(top) & set(bottom))
        if top[i] is not None and bottom[i]
    ]
    top_median = spread(list(top.values()))["median"]
    bottom_median = spread(list(bottom.values()))["median"]
    of_medians = top_median / bottom_median if top_median is not None and bottom_median else None
    return {
        "of_medians": of_medians,
        "per_round": spread(per_round),
        "per_round_median_interval": median_interval(per_round),
    }


def machine_state() -> dict:
    """The load average and CPU count, for a report's header."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpus": cpus, "load_average": _load_average()}
