"""convstack bench footprint: import times from fresh interpreters, installed closures from
distribution metadata, one JSON report (reachable as `convstack bench client --footprint`)."""

from __future__ import annotations

import json
import sys

from convstack.bench import client as bench_client
from convstack.bench import footprint


def test_a_closure_counts_a_distribution_and_what_it_requires():
    found = footprint.closure("aiohttp")

    assert found["distributions"] >= 3  # aiohttp, yarl, multidict, ...
    assert found["largest_mib"]["aiohttp"] > 0
    assert found["mib"] >= sum(found["largest_mib"].values()) - 0.5


def test_an_absent_distribution_has_an_empty_closure():
    assert footprint.closure("no-such-distribution-here")["distributions"] == 0
    assert footprint.closure_in(sys.executable, "no-such-distribution-here") is None


def test_import_time_is_the_median_of_fresh_interpreters():
    timing = footprint.import_time(sys.executable, "import json", runs=3)

    assert len(timing["runs"]) == 3
    assert timing["median_s"] == round(sorted(timing["runs"])[1], 3)
    assert timing["modules"] > 10
    assert footprint.import_time(sys.executable, "import no_such_module", runs=1) is None


def test_bench_client_footprint_writes_the_report(tmp_path, monkeypatch, capsys):
    # TensorFlow's import takes seconds: any module stands in for it here.
    monkeypatch.setattr(footprint, "TF_SERVING_IMPORT", "import json")
    out = tmp_path / "footprint.json"

    assert bench_client.bench_main(["--footprint", "--runs", "1", "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    assert report["client"]["import"]["modules"] > 0
    assert report["client"]["installed"]["distributions"] >= 4
    assert "client: import" in capsys.readouterr().out
