"""`convstack bench serve`: a missing model is a usage error, shapes parse, the goals are judged
from the medians (batching round by round), and a very short run on the tiny model keeps every
interleaved round with its CPU figures and summarizes them."""

from __future__ import annotations

import itertools
import json

import pytest

from convstack.bench import rounds
from convstack.bench.serve import (
    DEFAULT_SHAPES,
    PROTOCOLS,
    SERVER_KINDS,
    bench_main,
    build_parser,
    evaluate_goals,
    reported_threads,
    server_flags,
    shape_key,
    tflite_served,
    tflite_text,
)
from tests.serving.helpers import make_model_dir


def test_missing_model_is_a_usage_error_that_says_what_to_run(tmp_path, capsys):
    code = bench_main(["--model-base", str(tmp_path), "--model-name", "digits"])
    assert code == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "digits") in error
    assert "make demo" in error and "convstack train" in error


def test_shapes_parse_and_bad_ones_name_the_item(capsys):
    args = build_parser().parse_args(["--shapes", "1x1, 32X4"])
    assert args.shapes == ((1, 1), (32, 4))
    assert build_parser().parse_args([]).shapes == DEFAULT_SHAPES == ((1, 1), (1, 32), (32, 4))
    for bad in ("1x", "0x4", "2y3"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--shapes", f"1x1,{bad}"])
        assert repr(bad) in capsys.readouterr().err


def _summary(rps: float, p50: float = 1.0, p99: float = 2.0) -> dict:
    def figure(value):
        return {"median": value, "min": value, "max": value, "n": 5}

    return {"throughput": figure(rps), "latency_ms.p50": figure(p50), "latency_ms.p99": figure(p99)}


def _pair(per_round: list[float]) -> dict:
    """compute_ratios' batched/unbatched entry for these round-by-round ratios."""
    records = [
        {"round": i, "variant": name, "figures": {"throughput": value}}
        for i, ratio in enumerate(per_round)
        for name, value in (("batched", 100.0 * ratio), ("unbatched", 100.0))
    ]
    return rounds.paired_ratio(records, "batched", "unbatched", "throughput")


def test_goals_judge_batching_the_peer_and_the_overhead_from_medians():
    names = ["unbatched", "batched", "kserve", "kserve-gc-freeze"]
    summaries = {
        "grpc/b1/c1": {
            "unbatched": _summary(300, p50=1.2, p99=3.0),
            "batched": _summary(290),
            "kserve": _summary(100),
            "kserve-gc-freeze": _summary(150, p99=4.0),
        },
        "rest/b32/c4": {
            "unbatched": _summary(100, p99=50.0),
            "batched": _summary(160, p99=60.0),
            "kserve": _summary(10),
            "kserve-gc-freeze": _summary(100, p99=55.0),
        },
    }
    ratios = {
        "grpc/b1/c1": {"batched/unbatched": _pair([0.95, 0.96, 0.97] * 7)},
        "rest/b32/c4": {"batched/unbatched": _pair([1.6] * 20)},
    }
    floor = {"1": {"latency_ms": {"p50": 0.5}}}
    goals = evaluate_goals(summaries, floor, names, ratios)
    assert goals["batching_not_slower/grpc/b1/c1"]["met"] is False
    assert goals["batching_not_slower/rest/b32/c4"]["measured"] == pytest.approx(1.6)
    ahead = goals["ahead_of_kserve_gc_freeze/grpc/b1/c1"]
    assert (ahead["variant"], ahead["measured"], ahead["met"]) == ("unbatched", 2.0, True)
    # 1.6x with the batched server, but its p99 is above the peer's: not met.
    ahead = goals["ahead_of_kserve_gc_freeze/rest/b32/c4"]
    assert (ahead["variant"], ahead["measured"], ahead["met"]) == ("batched", 1.6, False)
    overhead = goals["grpc_batch1_p50_overhead_ms"]
    assert overhead["measured"] == pytest.approx(0.7) and overhead["met"] is True
    assert not any(key.startswith("ahead") for key in evaluate_goals(
        {"grpc/b1/c1": {"unbatched": _summary(1)}}, {}, ["unbatched"], {}
    ))  # fmt: skip


@pytest.mark.parametrize(
    ("per_round", "met"),
    [
        ([0.99, 1.0, 1.01] * 7, True),  # equal within the noise: the interval holds 1
        ([0.98] * 10 + [1.0] * 10, True),  # a median below 1, an interval reaching it
        ([0.985] * 15 + [1.02] * 5, False),  # 15 of 20 below: the interval stops short of 1
        ([1.3] * 5, True),
    ],
)
def test_batching_is_slower_only_when_the_median_ratios_interval_lies_below_one(per_round, met):
    goal = evaluate_goals({"k": {}}, {}, [], {"k": {"batched/unbatched": _pair(per_round)}})
    assert goal["batching_not_slower/k"]["met"] is met
    assert goal["batching_not_slower/k"]["control"] is None


def test_the_batching_goal_shows_the_control_servers_ratio_beside_it():
    ratios = {"k": {"batched/unbatched": _pair([0.99] * 10), "unbatched-again/unbatched": _pair(
        [0.97, 0.98, 0.99, 1.0, 1.01] * 2
    )}}  # fmt: skip
    control = evaluate_goals({"k": {}}, {}, [], ratios)["batching_not_slower/k"]["control"]
    assert control["measured"] == pytest.approx(0.99)
    assert control["interval"] == [pytest.approx(0.97), pytest.approx(1.01)]


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


def test_the_report_says_which_tflite_model_the_tflite_variant_serves(tmp_path):
    version = tmp_path / "digits" / "1"
    (version / "assets.extra").mkdir(parents=True)
    assert tflite_served(version)["quantization"] == "float32"  # the benchmark converts one
    (version / "model.tflite").write_bytes(b"flatbuffer")
    card = {"tflite": {"quantization": "int8", "test_accuracy": 0.9582,
                       "saved_model_test_accuracy": 0.961}}  # fmt: skip
    (version / "assets.extra" / "model_card.json").write_text(json.dumps(card))

    served = tflite_served(version)

    assert served["quantization"] == "int8"
    assert (served["test_accuracy"], served["saved_model_test_accuracy"]) == (0.9582, 0.961)
    assert "int8" in tflite_text(served) and "0.9582 against the SavedModel's 0.9610" in (
        tflite_text(served)
    )


@pytest.mark.slow
def test_short_run_keeps_every_round_and_summarizes_them(tmp_path, capsys):
    make_model_dir(tmp_path / "models")
    out = tmp_path / "results" / "serve.json"
    argv = ["--model-base", str(tmp_path / "models"), "--model-name", "tiny"]
    threads = ["--server-intra-op-threads", "2", "--server-inter-op-threads", "1"]
    short = ["--duration", "0.2", "--rounds", "2", "--shapes", "1x1,4x2", "--no-tflite"]
    code = bench_main([*argv, *threads, *short, "--control", "--out", str(out)])

    assert code == 0
    report = json.loads(out.read_text())
    assert report["model"] == {"base": str(tmp_path / "models"), "name": "tiny", "version": 1}
    assert {"cpus", "python", "tensorflow", "note", "before", "after"} <= set(report["machine"])
    assert {kind: s["exit_code"] for kind, s in report["servers"].items()} == {
        "unbatched": 0,
        "batched": 0,
        "unbatched-again": 0,
    }
    # The option reached both servers, and each says its TensorFlow ran with it.
    assert report["tensorflow_threads"]["servers"] == {"intra_op": 2, "inter_op": 1}
    for server in report["servers"].values():
        assert server["tensorflow_threads_reported"] == {"intra_op": 2, "inter_op": 1}
    assert set(report["floor"]) == {"1", "4"}
    assert report["tflite"] is None  # --no-tflite

    keys = {shape_key(p, b, c) for p, (b, c) in itertools.product(PROTOCOLS, [(1, 1), (4, 2)])}
    assert set(report["rounds_by_shape"]) == set(report["summary"]) == keys
    for key, records in report["rounds_by_shape"].items():
        # Two rounds of the three servers, back to back, the order rotated.
        assert [(r["round"], r["variant"]) for r in records] == [
            (0, "unbatched"), (0, "batched"), (0, "unbatched-again"),
            (1, "batched"), (1, "unbatched-again"), (1, "unbatched"),
        ]  # fmt: skip
        for record in records:
            figures = record["figures"]
            assert figures["ok"] == figures["requests"] > 0 and figures["errors"] == {}
            assert figures["server_cpu_ms_per_request"] > 0
            assert record["cores"]["watched"]["server"] > 0
            assert isinstance(record["contended"], bool) and len(record["load_average"]) == 3
        for name, summary in report["summary"][key].items():
            rps = [r["figures"]["throughput"] for r in records if r["variant"] == name]
            assert summary["throughput"]["min"] == min(rps)
            assert summary["throughput"]["max"] == max(rps)
            assert summary["rounds"] == 2
        for name in ("batched/unbatched", "unbatched-again/unbatched"):
            ratio = report["ratios"][key][name]
            assert ratio["per_round"]["n"] == 2 and ratio["of_medians"] > 0
    assert {"batching_not_slower/grpc/b1/c1", "grpc_batch1_p50_overhead_ms"} <= set(report["goals"])
    control = report["goals"]["batching_not_slower/grpc/b1/c1"]["control"]
    assert control["measured"] > 0 and len(control["interval"]) == 2
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    printed = capsys.readouterr().out
    assert "grpc/b1/c1" in printed and "batched/unbatched" in printed
    assert "(two identical unbatched servers: " in printed
    assert "servers 2/1 (reported: unbatched 2/1, batched 2/1, unbatched-again 2/1)" in printed
