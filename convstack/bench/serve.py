"""`convstack bench serve`: what serving costs on top of the model itself.

Measures, in one run on this machine: the floor (the in-process `LoadedVersion.run` call, no
transport), then Predict over gRPC and REST on loopback against `convstack serve` subprocesses
without and with server-side batching, at batch 1 and 32 and concurrency 1 and 32 (closed loop,
client.loadgen); both servers run with the same TensorFlow thread pools (--server-intra-op-threads,
--server-inter-op-threads). Reports latency, throughput, each p50 over the floor at the same
batch, the batching speed-up, and two goals. A benchmark, not a test: it reports, never fails on
a number.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from convstack.common.files import write_json_atomic
from convstack.serving.cli import thread_count
from convstack.serving.process import ServerProcess, ServerProcessError

log = logging.getLogger(__name__)

DEFAULT_MODEL_BASE = "build/demo/models"
DEFAULT_MODEL_NAME = "digits"
SIGNATURE = "serving_default"
BATCH_SIZES = (1, 32)
CONCURRENCIES = (1, 32)
PROTOCOLS = ("grpc", "rest")
# A common starting point for a small CPU model: batches up to 32 rows, waiting at most 2 ms for
# them to fill, one batch per core, and a queue deep enough for 32 concurrent clients.
BATCHING_PARAMETERS = {
    "max_batch_size": 32,
    "batch_timeout_micros": 2000,
    "num_batch_threads": 2,
    "max_enqueued_batches": 64,
}
SERVER_KINDS = {"unbatched": False, "batched": True}
# Both servers get the same TensorFlow thread pools, so the comparison stays fair. One thread
# each: with TensorFlow's defaults (a pool thread per core) the pools compete for this machine's
# two cores with the event loop and the load client, and this small model gains nothing from
# them (measured: server CPU per request ~10-25% lower than with the defaults).
DEFAULT_SERVER_INTRA_OP_THREADS = 1
DEFAULT_SERVER_INTER_OP_THREADS = 1
# The line the embedded server logs once its models loaded (serving/server.py).
_THREADS_LOGGED = re.compile(
    r"TensorFlow thread pools: intra_op_parallelism=(\d+) inter_op_parallelism=(\d+)"
)
GOAL_OVERHEAD_MS = 1.0
GOAL_BATCHING_SPEEDUP = 2.0
FLOOR_MIN_CALLS = 20
WARMUP_REQUESTS = 10
EXIT_BAD_INPUT = 2


class BenchError(RuntimeError):
    """The benchmark cannot run: a missing model, a server that does not start."""


class MissingModelError(BenchError):
    """No exported version where the benchmark looks (a usage error)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convstack bench serve",
        description="Latency and throughput of Predict over gRPC and REST, without and with "
        "server-side batching, against the in-process model call.",
    )
    parser.add_argument(
        "--model-base", default=DEFAULT_MODEL_BASE, help=f"default: {DEFAULT_MODEL_BASE}"
    )
    parser.add_argument(
        "--model-name", default=DEFAULT_MODEL_NAME, help=f"default: {DEFAULT_MODEL_NAME}"
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per measurement (default 5)"
    )
    parser.add_argument(
        "--server-intra-op-threads",
        type=thread_count,
        default=DEFAULT_SERVER_INTRA_OP_THREADS,
        metavar="N",
        help="both servers' --tensorflow_intra_op_parallelism; 0: TensorFlow decides "
        f"(default {DEFAULT_SERVER_INTRA_OP_THREADS})",
    )
    parser.add_argument(
        "--server-inter-op-threads",
        type=thread_count,
        default=DEFAULT_SERVER_INTER_OP_THREADS,
        metavar="N",
        help="both servers' --tensorflow_inter_op_parallelism; 0: TensorFlow decides "
        f"(default {DEFAULT_SERVER_INTER_OP_THREADS})",
    )
    parser.add_argument(
        "--out",
        default="bench-results/serve.json",
        help="JSON output; the plot is written next to it as .png",
    )
    return parser


# --- the model and its inputs -----------------------------------------------------------------


def latest_version(model_base: Path, model_name: str) -> tuple[int, Path]:
    """The highest numeric version under model_base/model_name (BenchError if none)."""
    model_dir = Path(model_base) / model_name
    versions = (
        sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir())
        if model_dir.is_dir()
        else []
    )
    if not versions:
        raise MissingModelError(
            f"no exported version under {model_dir}: run `make demo` (or `convstack train "
            "--model-base DIR --model-name NAME`) first, or pass --model-base/--model-name"
        )
    return versions[-1], model_dir / str(versions[-1])


def make_inputs(signature, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs in [0, 1) of the signature's dtypes and shapes, `batch` rows."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, info in signature.inputs.items():
        if info.shape is None or any(dim is None for dim in info.shape[1:]):
            raise BenchError(f"input {name!r} has no fixed shape beyond the batch: {info.shape}")
        if info.dtype.kind not in "fiu":
            raise BenchError(f"input {name!r} is {info.dtype}; the benchmark sends numbers only")
        shape = (batch, *info.shape[1:])
        inputs[name] = rng.uniform(0.0, 1.0, size=shape).astype(info.dtype)
    return inputs


def measure_floor(loaded, inputs: dict[str, np.ndarray], duration: float) -> dict:
    """Time `loaded.run` (validation, tensor conversion, the signature call) in a loop."""
    for _ in range(5):  # tracing and allocator warm-up
        loaded.run(SIGNATURE, inputs)
    latencies = []
    started = time.perf_counter()
    while time.perf_counter() - started < duration or len(latencies) < FLOOR_MIN_CALLS:
        call = time.perf_counter()
        loaded.run(SIGNATURE, inputs)
        latencies.append(time.perf_counter() - call)
    seconds = time.perf_counter() - started
    from convstack.client.loadgen import latency_summary

    return {
        "calls": len(latencies),
        "seconds": seconds,
        "throughput": len(latencies) / seconds,
        "latency_ms": latency_summary(latencies),
    }


# --- server subprocesses: serving.process.ServerProcess ------------------------------------


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_batching_parameters(path: Path, parameters: dict[str, int]) -> Path:
    """A BatchingParameters text proto (wrapper fields, as TF Serving reads them)."""
    path.write_text("".join(f"{key} {{ value: {value} }}\n" for key, value in parameters.items()))
    return path


# --- measurements -----------------------------------------------------------------------------


def _measure_server(kind, server, model_name, inputs_by_batch, duration) -> list[dict]:
    from convstack.client.loadgen import LoadSpec

    results = []
    for protocol in PROTOCOLS:
        target = server.grpc_target if protocol == "grpc" else server.rest_target
        for batch, inputs in inputs_by_batch.items():
            for concurrency in CONCURRENCIES:
                spec = LoadSpec(
                    target=target,
                    protocol=protocol,
                    model_name=model_name,
                    inputs=inputs,
                    concurrency=concurrency,
                    duration=duration,
                    warmup_requests=WARMUP_REQUESTS,
                )
                load, cpu = _load_with_cpu(spec, server.process.pid)
                entry = {
                    "key": f"{protocol}/{kind}/b{batch}/c{concurrency}",
                    "protocol": protocol,
                    "server": kind,
                    "batch": batch,
                    "concurrency": concurrency,
                    **load.to_json(),
                    "images_per_second": load.throughput * batch,
                    "cpu_percent": cpu,
                }
                log.info(
                    "%s: p50 %.2f ms, %.0f req/s, errors %s",
                    entry["key"],
                    load.latency_ms["p50"],
                    load.throughput,
                    load.errors or "none",
                )
                results.append(entry)
    return results


def _load_with_cpu(spec, server_pid: int):
    """The load result, and the CPU the client (this process) and the server used meanwhile, in
    percent of one core over the whole run, warmup included: on a shared machine they show who
    held the cores."""
    from convstack.client.loadgen import run_load_sync

    wall, client = time.perf_counter(), time.process_time()
    server = process_cpu_seconds(server_pid)
    load = run_load_sync(spec)
    wall = time.perf_counter() - wall
    client = time.process_time() - client
    server_after = process_cpu_seconds(server_pid)
    server = None if server is None or server_after is None else server_after - server
    return load, {
        "client": 100 * client / wall,
        "server": None if server is None else 100 * server / wall,
    }


def server_flags(kind: str, workdir: Path, threads: dict[str, int]) -> list[str]:
    """`convstack serve` flags of one server kind: the thread pools, and batching if batched."""
    flags = [
        f"--tensorflow_intra_op_parallelism={threads['intra_op']}",
        f"--tensorflow_inter_op_parallelism={threads['inter_op']}",
    ]
    if SERVER_KINDS[kind]:
        path = write_batching_parameters(workdir / "batching.config", BATCHING_PARAMETERS)
        flags += ["--enable_batching", f"--batching_parameters_file={path}"]
    return flags


def reported_threads(log_text: str) -> dict[str, int] | None:
    """The thread pools a server said its TensorFlow runs with, from its log (None if absent)."""
    match = _THREADS_LOGGED.search(log_text)
    return {"intra_op": int(match[1]), "inter_op": int(match[2])} if match else None


def _run_server(kind, model_name, model_dir, workdir, inputs_by_batch, duration, threads) -> dict:
    flags = server_flags(kind, workdir, threads)
    server = ServerProcess.start(model_name, model_dir, workdir / f"{kind}.log", flags)
    try:
        server.wait_available(model_name)
        reported = reported_threads(server.log_path.read_text(errors="replace"))
        if reported != threads:
            log.warning(
                "the %s server reports TensorFlow threads %s, not %s", kind, reported, threads
            )
        measurements = _measure_server(kind, server, model_name, inputs_by_batch, duration)
    finally:
        exit_code = server.stop()
    if exit_code != 0:
        log.error("the %s server exited with %s:\n%s", kind, exit_code, server.log_tail())
    return {
        "flags": flags,
        "tensorflow_threads_reported": reported,
        "exit_code": exit_code,
        "measurements": measurements,
    }


def _p50(entry: dict) -> float:
    value = entry["latency_ms"]["p50"]
    return math.nan if value is None else value


def _ratio(a: float, b: float) -> float | None:
    return None if not (a > 0 and b > 0) else a / b


def compute_ratios(floor: dict, measurements: list[dict]) -> dict:
    """Each p50 over the floor's at the same batch and the difference in ms; batched over
    unbatched throughput at concurrency 32, batch 1, per protocol."""
    p50_over, overhead = {}, {}
    for entry in measurements:
        base = floor[str(entry["batch"])]["latency_ms"]["p50"]
        p50 = _p50(entry)
        p50_over[entry["key"]] = _ratio(p50, base)
        overhead[entry["key"]] = None if math.isnan(p50) else p50 - base
    by_key = {entry["key"]: entry for entry in measurements}
    speedup = {
        protocol: _ratio(
            by_key[f"{protocol}/batched/b1/c32"]["throughput"],
            by_key[f"{protocol}/unbatched/b1/c32"]["throughput"],
        )
        for protocol in PROTOCOLS
    }
    return {
        "p50_over_floor": p50_over,
        "overhead_ms": overhead,
        "batched_over_unbatched_throughput_c32_b1": speedup,
    }


def evaluate_goals(ratios: dict) -> dict:
    """The two goals, each with its target, the measured value and whether it was met."""
    overhead = ratios["overhead_ms"]["grpc/unbatched/b1/c1"]
    speedup = ratios["batched_over_unbatched_throughput_c32_b1"]["grpc"]
    return {
        "grpc_batch1_p50_overhead_ms": {
            "target": f"< {GOAL_OVERHEAD_MS}",
            "measured": overhead,
            "met": overhead is not None and overhead < GOAL_OVERHEAD_MS,
        },
        "grpc_batching_throughput_speedup_c32_b1": {
            "target": f">= {GOAL_BATCHING_SPEEDUP}",
            "measured": speedup,
            "met": speedup is not None and speedup >= GOAL_BATCHING_SPEEDUP,
        },
    }


def machine_info() -> dict:
    """Where the numbers were measured."""
    import grpc
    import tensorflow as tf

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpus": cpus,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "note": f"the load generator (this Python process, asyncio) and each server share "
        f"these {cpus} CPUs; each measurement's cpu_percent (100 = one core, warmup included) "
        "shows how they split them. A client on its own machine would leave the server more",
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _measure_all(args, loaded, model_dir: Path):
    inputs_by_batch = {
        batch: make_inputs(loaded.signature(SIGNATURE), batch) for batch in BATCH_SIZES
    }
    floor = {}
    for batch, inputs in inputs_by_batch.items():
        floor[str(batch)] = measure_floor(loaded, inputs, args.duration)
        log.info("floor b%d: p50 %.3f ms", batch, floor[str(batch)]["latency_ms"]["p50"])
    threads = server_threads(args)
    servers, measurements = {}, []
    with tempfile.TemporaryDirectory(prefix="convstack-bench-serve-") as workdir:
        for kind in SERVER_KINDS:
            servers[kind] = _run_server(
                kind,
                args.model_name,
                model_dir,
                Path(workdir),
                inputs_by_batch,
                args.duration,
                threads,
            )
            measurements += servers[kind].pop("measurements")
    return floor, servers, measurements


def server_threads(args: argparse.Namespace) -> dict[str, int]:
    """The TensorFlow thread pools both servers run with."""
    return {"intra_op": args.server_intra_op_threads, "inter_op": args.server_inter_op_threads}


def _floor_threads() -> dict[str, int]:
    import tensorflow as tf

    return {
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def run_benchmark(args: argparse.Namespace) -> dict:
    """Every measurement, ratio and goal as one JSON-ready dict."""
    from convstack.serving.servable import load_version

    version, path = latest_version(Path(args.model_base), args.model_name)
    # Other work on the machine skews every figure; recorded so a reader can tell.
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    log.info("benchmarking %s version %d (%s)", args.model_name, version, path)
    loaded = load_version(args.model_name, version, path)
    # TensorFlow's Python heap is large; without this, a full collection in this process (the
    # floor and the load generator) pauses it for ~0.2 s now and then.
    gc.freeze()
    try:
        floor, servers, measurements = _measure_all(args, loaded, path.parent)
    finally:
        gc.unfreeze()
    ratios = compute_ratios(floor, measurements)
    return {
        "benchmark": "serve",
        "model": {"base": str(Path(args.model_base)), "name": args.model_name, "version": version},
        "duration_seconds": args.duration,
        "warmup_requests": WARMUP_REQUESTS,
        "load": "closed loop (client.loadgen), one request per worker at a time",
        "machine": machine_info() | {"load_average_before": load_before},
        "batching_parameters": BATCHING_PARAMETERS,
        "tensorflow_threads": {
            "servers": server_threads(args),
            "floor": _floor_threads(),
            "note": "TensorFlow's intra-op and inter-op thread pools; 0: TensorFlow decides "
            "(about one thread per core each). Both servers run with the same; the floor runs "
            "in this process with TensorFlow's defaults",
        },
        "servers": servers,
        "floor": floor,
        "measurements": measurements,
        "ratios": ratios,
        "goals": evaluate_goals(ratios),
    }


# --- output -----------------------------------------------------------------------------------


def _fmt(value, spec: str = ".2f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:{spec}}"
    )


def _cpu_text(cpu: dict) -> str:
    return f"{_fmt(cpu['client'], '.0f')}/{_fmt(cpu['server'], '.0f')}"


def summary_table(report: dict) -> str:
    """The printed summary: one row per configuration, then the ratios and goals."""
    header = f"{'configuration':<26}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'img/s':>10}"
    header += f"{'p50/floor':>11}{'+ms':>8}{'cpu% cli/srv':>14}  errors"
    rows = [header, "-" * len(header)]
    for batch, floor in report["floor"].items():
        lat = floor["latency_ms"]
        rows.append(
            f"{'in-process/b' + batch:<26}{_fmt(lat['p50']):>9}{_fmt(lat['p99']):>9}"
            f"{_fmt(floor['throughput'], '.0f'):>9}"
            f"{_fmt(floor['throughput'] * int(batch), '.0f'):>10}{'1.00':>11}{'0':>8}{'':>14}"
        )
    ratios = report["ratios"]
    for entry in report["measurements"]:
        key, lat = entry["key"], entry["latency_ms"]
        errors = ", ".join(f"{k}={v}" for k, v in entry["errors"].items()) or "-"
        rows.append(
            f"{key:<26}{_fmt(lat['p50']):>9}{_fmt(lat['p99']):>9}"
            f"{_fmt(entry['throughput'], '.0f'):>9}{_fmt(entry['images_per_second'], '.0f'):>10}"
            f"{_fmt(ratios['p50_over_floor'][key]):>11}{_fmt(ratios['overhead_ms'][key]):>8}"
            f"{_cpu_text(entry['cpu_percent']):>14}  {errors}"
        )
    speedup = ratios["batched_over_unbatched_throughput_c32_b1"]
    rows.append("")
    rows.append(
        "batched/unbatched throughput at c32 b1: "
        + ", ".join(f"{p} {_fmt(v)}x" for p, v in speedup.items())
    )
    for name, goal in report["goals"].items():
        verdict = "met" if goal["met"] else "NOT met"
        rows.append(f"goal {name} {goal['target']}: measured {_fmt(goal['measured'])}, {verdict}")
    rows.append(_threads_text(report))
    return "\n".join(rows)


def _threads_text(report: dict) -> str:
    def pools(threads: dict | None) -> str:
        return "unknown" if threads is None else f"{threads['intra_op']}/{threads['inter_op']}"

    threads = report["tensorflow_threads"]
    reported = ", ".join(
        f"{kind} {pools(server['tensorflow_threads_reported'])}"
        for kind, server in report["servers"].items()
    )
    return (
        f"TensorFlow threads intra/inter-op (0: TensorFlow decides): servers "
        f"{pools(threads['servers'])} (reported: {reported}), in-process floor "
        f"{pools(threads['floor'])}"
    )


def write_plot(report: dict, path: Path) -> Path:
    """Images/s and p50 latency per configuration, side by side (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, images, p50s, colors = [], [], [], []
    palette = {"floor": "0.5", "unbatched": "tab:blue", "batched": "tab:orange"}
    for batch, floor in report["floor"].items():
        labels.append(f"in-process/b{batch}")
        images.append(floor["throughput"] * int(batch))
        p50s.append(floor["latency_ms"]["p50"])
        colors.append(palette["floor"])
    for entry in report["measurements"]:
        labels.append(entry["key"])
        images.append(entry["images_per_second"])
        p50s.append(_p50(entry))
        colors.append(palette[entry["server"]])
    rows = np.arange(len(labels))
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 0.32 * len(labels) + 1.8), sharey=True)
    left.barh(rows, images, color=colors)
    left.set_xscale("log")
    left.set_xlabel("images / s (log)")
    left.set_yticks(rows, labels, fontsize=8)
    left.invert_yaxis()
    right.barh(rows, np.nan_to_num(p50s), color=colors)
    right.set_xscale("log")
    right.set_xlabel("p50 latency (ms, log)")
    for axis, values, spec in ((left, images, ".0f"), (right, p50s, ".2f")):
        axis.margins(x=0.12)  # room for the value labels
        for row, value in zip(rows, values, strict=True):
            axis.annotate(
                _fmt(value, spec),
                (value, row),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
    machine = report["machine"]
    figure.suptitle(
        f"convstack serve: {report['model']['name']} v{report['model']['version']}, "
        f"{machine['cpus']} CPUs shared by client and server, TF {machine['tensorflow']}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def bench_main(argv: list[str]) -> int:
    """`convstack bench serve`: run, print the summary, save JSON and PNG. 0 when it ran (goals
    met or not), 2 for a missing model, 1 if a server failed or did not exit cleanly."""
    args = build_parser().parse_args(argv)
    from convstack.common.logs import configure_logging

    configure_logging()
    try:
        report = run_benchmark(args)
    except (BenchError, ServerProcessError) as exc:
        print(f"convstack bench serve: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(exc, MissingModelError) else 1
    out = Path(args.out)
    write_json_atomic(out, report, sort_keys=False)
    plot = write_plot(report, out.with_suffix(".png"))
    print(summary_table(report))
    print(f"\nsaved {out} and {plot}")
    unclean = {kind: s["exit_code"] for kind, s in report["servers"].items() if s["exit_code"]}
    if unclean:
        print(f"convstack bench serve: servers did not exit cleanly: {unclean}", file=sys.stderr)
        return 1
    return 0
