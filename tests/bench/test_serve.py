"""`convstack bench serve`: a missing model is a usage error, the goals are judged from the
ratios, and a very short run on the tiny model writes every measurement, ratio and goal."""

from __future__ import annotations

import itertools
import json

import pytest

from convstack.bench.serve import (
    BATCH_SIZES,
    CONCURRENCIES,
    PROTOCOLS,
    SERVER_KINDS,
    bench_main,
    build_parser,
    evaluate_goals,
    reported_threads,
    server_flags,
)
from tests.serving.helpers import make_model_dir

EXPECTED_KEYS = {
    f"{protocol}/{kind}/b{batch}/c{concurrency}"
    for protocol, kind, batch, concurrency in itertools.product(
        PROTOCOLS, SERVER_KINDS, BATCH_SIZES, CONCURRENCIES
    )
}


def test_missing_model_is_a_usage_error_that_says_what_to_run(tmp_path, capsys):
    code = bench_main(["--model-base", str(tmp_path), "--model-name", "digits"])
    assert code == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "digits") in error
    assert "make demo" in error and "convstack train" in error


@pytest.mark.parametrize(
    ("overhead", "speedup", "met"),
    [(0.4, 2.5, (True, True)), (1.2, 1.5, (False, False)), (None, None, (False, False))],
)
def test_goals_are_judged_against_their_targets(overhead, speedup, met):
    ratios = {
        "overhead_ms": {"grpc/unbatched/b1/c1": overhead},
        "batched_over_unbatched_throughput_c32_b1": {"grpc": speedup, "rest": 1.0},
    }
    goals = evaluate_goals(ratios)
    assert goals["grpc_batch1_p50_overhead_ms"]["measured"] == overhead
    assert goals["grpc_batching_throughput_speedup_c32_b1"]["measured"] == speedup
    assert (
        goals["grpc_batch1_p50_overhead_ms"]["met"],
        goals["grpc_batching_throughput_speedup_c32_b1"]["met"],
    ) == met


def test_both_servers_get_the_same_thread_flags_default_one_each(tmp_path):
    args = build_parser().parse_args([])
    threads = {"intra_op": args.server_intra_op_threads, "inter_op": args.server_inter_op_threads}
    assert threads == {"intra_op": 1, "inter_op": 1}
    flags = {kind: server_flags(kind, tmp_path, threads) for kind in SERVER_KINDS}
    expected = ["--tensorflow_intra_op_parallelism=1", "--tensorflow_inter_op_parallelism=1"]
    for kind_flags in flags.values():
        assert [f for f in kind_flags if f.startswith("--tensorflow_")] == expected
    assert "--enable_batching" in flags["batched"]
    assert "--enable_batching" not in flags["unbatched"]


def test_reported_threads_come_from_the_server_log():
    line = (
        "2026-01-01 00:00:00,000 INFO serving.server: TensorFlow thread pools: "
        "intra_op_parallelism=1 inter_op_parallelism=0 (0: TensorFlow decides)\n"
    )
    assert reported_threads("noise\n" + line) == {"intra_op": 1, "inter_op": 0}
    assert reported_threads("a server that never said\n") is None


@pytest.mark.slow
def test_short_run_writes_every_measurement_ratio_and_goal(tmp_path, capsys):
    make_model_dir(tmp_path / "models")
    out = tmp_path / "results" / "serve.json"
    argv = ["--model-base", str(tmp_path / "models"), "--model-name", "tiny"]
    threads = ["--server-intra-op-threads", "2", "--server-inter-op-threads", "1"]
    code = bench_main([*argv, *threads, "--duration", "0.2", "--out", str(out)])

    assert code == 0
    report = json.loads(out.read_text())
    assert report["model"] == {"base": str(tmp_path / "models"), "name": "tiny", "version": 1}
    assert {"cpus", "python", "tensorflow", "note"} <= set(report["machine"])
    assert {kind: s["exit_code"] for kind, s in report["servers"].items()} == {
        "unbatched": 0,
        "batched": 0,
    }
    # The option reached both servers, and each says its TensorFlow ran with it.
    assert report["tensorflow_threads"]["servers"] == {"intra_op": 2, "inter_op": 1}
    for server in report["servers"].values():
        assert server["tensorflow_threads_reported"] == {"intra_op": 2, "inter_op": 1}
    assert set(report["floor"]) == {str(batch) for batch in BATCH_SIZES}
    for floor in report["floor"].values():
        assert floor["calls"] > 0 and floor["latency_ms"]["p50"] > 0

    measurements = {entry["key"]: entry for entry in report["measurements"]}
    assert set(measurements) == EXPECTED_KEYS
    for entry in measurements.values():
        assert entry["ok"] == entry["requests"] > 0 and entry["errors"] == {}
        assert entry["images_per_second"] == pytest.approx(entry["throughput"] * entry["batch"])
        assert entry["latency_ms"]["p50"] <= entry["latency_ms"]["p99"]
        assert entry["cpu_percent"]["client"] > 0

    ratios = report["ratios"]
    assert set(ratios["p50_over_floor"]) == set(ratios["overhead_ms"]) == EXPECTED_KEYS
    assert all(value > 0 for value in ratios["p50_over_floor"].values())
    assert set(ratios["batched_over_unbatched_throughput_c32_b1"]) == set(PROTOCOLS)
    assert set(report["goals"]) == {
        "grpc_batch1_p50_overhead_ms",
        "grpc_batching_throughput_speedup_c32_b1",
    }
    assert all(isinstance(goal["met"], bool) for goal in report["goals"].values())

    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    printed = capsys.readouterr().out
    assert "grpc/batched/b1/c32" in printed and "goal grpc_batch1_p50_overhead_ms" in printed
    assert "servers 2/1 (reported: unbatched 2/1, batched 2/1)" in printed
