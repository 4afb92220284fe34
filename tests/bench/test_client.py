"""`convstack bench client`: the report's sections and exit codes, against the session's embedded
server (tests/client/conftest.py) serving the tiny model over gRPC and REST."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from convstack.bench.client import bench_main
from tests.client.conftest import MODEL

pytestmark = pytest.mark.slow

# Few latency pairs: the test checks the section's shape, not the figures.
FAST = ["--count", "12", "--concurrency", "3", "--latency-calls", "5"]


def _run(out, *flags: str) -> dict:
    assert bench_main([*flags, "--out", str(out), "--json"]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def grpc_report(server, tmp_path_factory):
    """One full gRPC run with the TensorFlow comparison (the expensive part, done once)."""
    out = tmp_path_factory.mktemp("bench") / "results" / "client.json"
    flags = ["--target", server.target, "--model", MODEL, "--batch-size", "4", *FAST]
    return _run(out, *flags)


def test_grpc_run_sends_count_requests_all_ok(grpc_report):
    load = grpc_report["load"]
    assert (load["requests"], load["ok"], load["errors"]) == (12, 12, {})
    assert load["throughput"] > 0
    latency = load["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert grpc_report["batch_size"] == 4 and grpc_report["mode"] == "closed"


def test_the_load_is_repeated_in_rounds_each_with_the_machines_load(grpc_report):
    rounds = grpc_report["load_rounds"]
    assert [r["round"] for r in rounds["rounds"]] == [0, 1, 2, 3, 4]  # the default five
    rates = sorted(r["figures"]["throughput"] for r in rounds["rounds"])
    assert grpc_report["load"]["throughput"] == rates[2]  # the median round
    summary = rounds["summary"]
    assert summary["throughput"]["min"] == rates[0] and summary["throughput"]["max"] == rates[-1]
    for record in rounds["rounds"]:
        assert record["figures"]["requests"] == 12 and len(record["load_average"]) == 3
        assert record["cores"]["own"] > 0 and isinstance(record["contended"], bool)


def test_codec_compares_client_and_tensorflow_on_request_shaped_arrays(grpc_report):
    codec = grpc_report["codec"]
    assert codec["shapes"]["inputs"] == {"images": [4, 28, 28, 1]}
    assert codec["shapes"]["outputs"]["probabilities"] == [4, 10]
    for who in ("client", "tensorflow"):
        figures = codec[who]
        assert figures["encode_us"] > 0 and figures["decode_us"] > 0
        assert figures["total_us"] == pytest.approx(figures["encode_us"] + figures["decode_us"])
    assert codec["ratio"] == pytest.approx(
        codec["tensorflow"]["total_us"] / codec["client"]["total_us"]
    )
    assert {"float32", "int64"} <= set(codec["by_dtype_us"])
    assert all(figures["ratio"] > 0 for figures in codec["by_dtype_us"].values())


def test_added_latency_reports_client_raw_and_difference(grpc_report):
    added = grpc_report["added_latency"]
    assert added["calls"] == 5
    assert added["client_ms"] > 0 and added["raw_stub_ms"] > 0
    assert added["added_ms"] == pytest.approx(added["client_ms"] - added["raw_stub_ms"])


def test_table_output_names_every_section(server, tmp_path, capsys):
    flags = ["--target", server.target, "--model", MODEL, *FAST, "--no-tf-comparison"]
    assert bench_main([*flags, "--label", "stable", "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    for fragment in ("throughput/s", "p99 ms", "error", "encode us", "added"):
        assert fragment in out
    assert "tensorflow" not in json.loads((tmp_path / "r.json").read_text())["codec"]


def test_rest_run_shapes_inputs_from_rest_metadata(server, tmp_path):
    target = f"http://127.0.0.1:{server.rest_port}"
    flags = ["--target", target, "--protocol", "rest", "--model", MODEL, "--version", "2"]
    report = _run(tmp_path / "rest.json", *flags, *FAST, "--no-tf-comparison")
    assert (report["load"]["requests"], report["load"]["ok"]) == (12, 12)
    assert report["codec"]["shapes"]["inputs"] == {"images": [1, 28, 28, 1]}
    assert "skipped" in report["added_latency"]


def test_rest_row_format_is_sent_when_asked(server, tmp_path):
    target = f"http://127.0.0.1:{server.rest_port}"
    flags = ["--target", target, "--protocol", "rest", "--model", MODEL, "--rest-format", "row"]
    report = _run(tmp_path / "row.json", *flags, *FAST, "--rounds", "1", "--no-tf-comparison")
    assert (report["load"]["requests"], report["load"]["ok"]) == (12, 12)
    assert len(report["load_rounds"]["rounds"]) == 1


def test_wrong_model_completes_with_not_found_errors(server, tmp_path):
    npy = tmp_path / "images.npy"
    np.save(npy, np.zeros((2, 28, 28, 1), np.float32))
    flags = ["--target", server.target, "--model", "nope", "--npy", f"images={npy}"]
    report = _run(tmp_path / "nope.json", *flags, *FAST, "--no-tf-comparison")
    assert report["load"]["ok"] == 0
    assert report["load"]["errors"] == {"NOT_FOUND": 12}
    assert "NOT_FOUND" in report["metadata_error"]
    assert report["added_latency"]["error"] == "NOT_FOUND"


def test_unreachable_target_exits_1_with_one_line(tmp_path, capsys):
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "never.json"
    code = bench_main(["--target", f"127.0.0.1:{port}", "--model", MODEL, "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{port}" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--rate", "10", "--concurrency", "2"],
        ["--count", "5", "--duration", "1"],
        ["--protocol", "rest"],  # with a host:port target
    ],
)
def test_contradictory_flags_are_usage_errors(flags, tmp_path, capsys):
    argv = ["--target", "127.0.0.1:1", "--model", MODEL, "--out", str(tmp_path / "x.json")]
    assert bench_main([*argv, *flags]) == 2
    assert capsys.readouterr().err
