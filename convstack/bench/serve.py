"""`convstack bench serve`: what serving costs on top of the model itself, and against a peer.

Measures, in one run on this machine: the floor (the in-process `LoadedVersion.run` call, no
transport), then Predict over gRPC and REST on loopback against `convstack serve` subprocesses
without and with server-side batching, at each shape (batch x concurrency, closed loop,
client.loadgen). With `--peer kserve` it also serves the same version with KServe's Python
`ModelServer` (its own venv, convstack/bench/peer.py), as its docs write a custom model and with
`gc.freeze()` after loading, and sends it the same REST bytes (TF Serving's row format, which
KServe's v1 protocol is) and the same tensors over its v2 gRPC.

Every server runs throughout; each shape is measured `--rounds` times with the variants
interleaved round by round (convstack/bench/rounds.py; the unbatched and batched servers back to
back in every round), the machine's CPU, this process's and each server's (/proc) recorded
around every measurement. Reports each figure's median and min-max, the server's CPU per
request, ratios round by round, rounds flagged where other work used the cores (`--reruns`
measures them again), and the goals. The JSON keeps every round. A benchmark, not a test: it
reports, never fails on a number.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convstack.bench import rounds as rounds_lib
from convstack.common.files import write_json_atomic
from convstack.common.flags import positive_int, positive_number
from convstack.serving.cli import thread_count
from convstack.serving.process import ServerProcess, ServerProcessError
from convstack.serving.rollout.repository import read_card

log = logging.getLogger(__name__)

DEFAULT_MODEL_BASE = "build/demo/models"
DEFAULT_MODEL_NAME = "digits"
SIGNATURE = "serving_default"
# (batch, concurrency): the table.
DEFAULT_SHAPES = ((1, 1), (1, 32), (32, 4))
PROTOCOLS = ("grpc", "rest")
# A common starting point for a small CPU model: batches up to 32 rows, waiting at most 2 ms for
# them to fill, and a queue deep enough for 32 concurrent clients; as many batch threads as the
# unbatched server has request threads (`convstack serve --request_threads`, 4), so the two
# differ only in batching. (With one per core, 2 here, REST 32x4 batched was 0.95x unbatched,
# 0.93-0.98 over 5 rounds; with 4, 1.05x, 1.03-1.12.)
BATCHING_PARAMETERS = {
    "max_batch_size": 32,
    "batch_timeout_micros": 2000,
    "num_batch_threads": 4,
    "max_enqueued_batches": 64,
}
# With --control, a second unbatched server: what two identical servers differ by (the instance
# a process happens to be, and the round-to-round noise), shown beside batched / unbatched.
CONTROL = "unbatched-again"
SERVER_KINDS = {"unbatched": False, "batched": True, CONTROL: False}  # kind: batching on
# Measured back to back in every round: batching's goal is their ratio, a few per cent either
# way, and this VM's speed drifts by more than that over the seconds the other variants take.
BATCHING_GROUP = ("unbatched", "batched", CONTROL)
# Our servers (the goals compare the fastest of them with the peer).
OURS = ("unbatched", "batched", "tflite")
PEERS = ("kserve",)
PEER_KINDS = {"kserve": False, "kserve-gc-freeze": True}  # kind: gc.freeze() after loading
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
GOAL_PEER_THROUGHPUT = 1.5
FLOOR_MIN_CALLS = 20
WARMUP_REQUESTS = 10
DEFAULT_ROUNDS = 5
DEFAULT_DURATION = 2.0
EXIT_BAD_INPUT = 2
SUMMARY_KEYS = (
    "throughput",
    "images_per_second",
    "latency_ms.p50",
    "latency_ms.p99",
    "server_cpu_ms_per_request",
    "client_cpu_ms_per_request",
)


class BenchError(RuntimeError):
    """The benchmark cannot run: a missing model, a server that does not start."""


class MissingModelError(BenchError):
    """No exported version where the benchmark looks (a usage error)."""


def shape_list(text: str) -> tuple[tuple[int, int], ...]:
    """`1x1,1x32,32x4` -> ((1, 1), (1, 32), (32, 4)): batch x concurrency."""
    shapes = []
    for item in text.split(","):
        batch, sep, concurrency = item.strip().lower().partition("x")
        if not (sep and batch.isdigit() and concurrency.isdigit()) or "0" in (batch, concurrency):
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not BATCHxCONCURRENCY with both >= 1 (e.g. 32x4)"
            )
        shapes.append((int(batch), int(concurrency)))
    return tuple(shapes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convstack bench serve",
        description="Latency and throughput of Predict over gRPC and REST, without and with "
        "server-side batching (and against KServe with --peer kserve), against the in-process "
        "model call; every shape measured in interleaved rounds.",
    )
    parser.add_argument(
        "--model-base", default=DEFAULT_MODEL_BASE, help=f"default: {DEFAULT_MODEL_BASE}"
    )
    parser.add_argument(
        "--model-name", default=DEFAULT_MODEL_NAME, help=f"default: {DEFAULT_MODEL_NAME}"
    )
    parser.add_argument(
        "--duration",
        type=positive_number,
        default=DEFAULT_DURATION,
        help=f"seconds per measurement (default {DEFAULT_DURATION})",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=DEFAULT_ROUNDS,
        help=f"measurements of every variant at every shape (default {DEFAULT_ROUNDS})",
    )
    parser.add_argument(
        "--reruns",
        type=int,
        default=0,
        help="measure a round again, up to this many times, while other work used the cores "
        "(default 0: flag it only)",
    )
    parser.add_argument(
        "--contended-cores",
        type=float,
        default=rounds_lib.DEFAULT_CONTENDED_CORES,
        help="other work above this many cores flags a round "
        f"(default {rounds_lib.DEFAULT_CONTENDED_CORES})",
    )
    parser.add_argument(
        "--shapes",
        type=shape_list,
        default=DEFAULT_SHAPES,
        help="BATCHxCONCURRENCY list (default "
        + ",".join(f"{b}x{c}" for b, c in DEFAULT_SHAPES)
        + ")",
    )
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="grpc,rest (default both)")
    parser.add_argument(
        "--peer",
        choices=PEERS,
        help="also serve the version with this peer (KServe: its own venv, cached) and compare",
    )
    parser.add_argument(
        "--no-batched", action="store_true", help="leave out convstack's batching server"
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help=f"also serve a second unbatched server ({CONTROL}), measured beside the other two: "
        "its ratio to the first shows how far two identical servers differ",
    )
    parser.add_argument(
        "--no-tflite",
        action="store_true",
        help="leave out convstack serving <version>/model.tflite (--prefer_tflite_model)",
    )
    parser.add_argument(
        "--server-intra-op-threads",
        type=thread_count,
        default=DEFAULT_SERVER_INTRA_OP_THREADS,
        metavar="N",
        help="every server's TensorFlow intra-op pool; 0: TensorFlow decides "
        f"(default {DEFAULT_SERVER_INTRA_OP_THREADS})",
    )
    parser.add_argument(
        "--server-inter-op-threads",
        type=thread_count,
        default=DEFAULT_SERVER_INTER_OP_THREADS,
        metavar="N",
        help="every server's TensorFlow inter-op pool; 0: TensorFlow decides "
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
    from convstack.client.loadgen import latency_summary

    for _ in range(5):  # tracing and allocator warm-up
        loaded.run(SIGNATURE, inputs)
    latencies = []
    started = time.perf_counter()
    while time.perf_counter() - started < duration or len(latencies) < FLOOR_MIN_CALLS:
        call = time.perf_counter()
        loaded.run(SIGNATURE, inputs)
        latencies.append(time.perf_counter() - call)
    seconds = time.perf_counter() - started
    return {
        "calls": len(latencies),
        "seconds": seconds,
        "throughput": len(latencies) / seconds,
        "latency_ms": latency_summary(latencies),
    }


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere)."""
    return rounds_lib.process_cpu_seconds(pid)


def write_batching_parameters(path: Path, parameters: dict[str, int]) -> Path:
    """A BatchingParameters text proto (wrapper fields, as TF Serving reads them)."""
    path.write_text("".join(f"{key} {{ value: {value} }}\n" for key, value in parameters.items()))
    return path


def server_flags(kind: str, workdir: Path, threads: dict[str, int]) -> list[str]:
    """`convstack serve` flags of one server kind: the thread pools, and batching if batched."""
    flags = [
        f"--tensorflow_intra_op_parallelism={threads['intra_op']}",
        f"--tensorflow_inter_op_parallelism={threads['inter_op']}",
    ]
    if SERVER_KINDS[kind]:
        path = write_batching_parameters(workdir / "batching.config", BATCHING_PARAMETERS)
        # A lone request runs at once instead of waiting 2 ms for others that cannot come.
        flags += ["--enable_batching", f"--batching_parameters_file={path}"]
        flags += ["--run_lone_batches_at_once"]
    return flags


def reported_threads(log_text: str) -> dict[str, int] | None:
    """The thread pools a server said its TensorFlow runs with, from its log (None if absent)."""
    match = _THREADS_LOGGED.search(log_text)
    return {"intra_op": int(match[1]), "inter_op": int(match[2])} if match else None


# --- the servers under test -------------------------------------------------------------------


@dataclass
class Variant:
    """One server under test: its process, and the gRPC protocol it speaks."""

    name: str
    server: object  # ServerProcess or peer.PeerProcess
    grpc_protocol: str  # "grpc" (TF Serving's Predict) or "grpc-v2" (ModelInfer)
    flags: list[str]
    input_names: dict[str, str] | None = None  # the signature's input -> this server's name

    def inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.input_names or {}
        return {names.get(name, name): value for name, value in inputs.items()}

    def target(self, protocol: str) -> str:
        return self.server.rest_target if protocol == "rest" else self.server.grpc_target

    def wire_protocol(self, protocol: str) -> str:
        return "rest" if protocol == "rest" else self.grpc_protocol


def start_variants(args, model_dir: Path, version_dir: Path, workdir: Path) -> list[Variant]:
    """Every server of the run, started and AVAILABLE (stopped again if one fails)."""
    threads = server_threads(args)
    started: list[Variant] = []
    try:
        for kind in SERVER_KINDS:
            if (kind == "batched" and args.no_batched) or (kind == CONTROL and not args.control):
                continue
            flags = server_flags(kind, workdir, threads)
            server = ServerProcess.start(args.model_name, model_dir, workdir / f"{kind}.log", flags)
            started.append(Variant(kind, server, "grpc", flags))
        if not args.no_tflite:
            started.append(_start_tflite(args, version_dir, workdir, threads))
        if args.peer == "kserve":
            started += _start_kserve(args, version_dir, workdir, threads)
        for variant in started:
            variant.server.wait_available(args.model_name)
    except BaseException:
        stop_variants(started)
        raise
    return started


def tflite_model_base(version_dir: Path, workdir: Path) -> Path:
    """A model base whose version has `model.tflite`: the version's own directory when it has
    one (`convstack train --tflite`), else a copy in `workdir` (links to the version's files
    but its warm-up requests) with `serving_default` converted by tf.lite.TFLiteConverter."""
    if (version_dir / "model.tflite").is_file():
        return version_dir.parent
    import tensorflow as tf

    base = workdir / "tflite-models" / version_dir.parent.name
    target = base / version_dir.name
    target.mkdir(parents=True)
    for item in version_dir.iterdir():
        # Not assets.extra: its warm-up requests name the SavedModel's inputs, which the
        # converted model (without signature metadata) names differently.
        if item.name != "assets.extra":
            (target / item.name).symlink_to(item.resolve())
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(version_dir), signature_keys=[SIGNATURE]
    )
    (target / "model.tflite").write_bytes(converter.convert())
    return base


def tflite_served(version_dir: Path) -> dict:
    """What the tflite variant serves, for the report: the version's own `model.tflite` as its
    model card describes it (quantisation, test accuracy beside the SavedModel's), or the
    float32 conversion `tflite_model_base` makes when the version has none."""
    if not (version_dir / "model.tflite").is_file():
        return {
            "source": "converted by the benchmark (tf.lite.TFLiteConverter, no signature "
            "metadata: answers only the probabilities)",
            "quantization": "float32",
        }
    entry = read_card(version_dir).get("tflite") or {}
    return {
        "source": "the version's model.tflite (convstack train --tflite)",
        "quantization": entry.get("quantization", "unknown"),
        "test_accuracy": entry.get("test_accuracy"),
        "saved_model_test_accuracy": entry.get("saved_model_test_accuracy"),
    }


def tflite_text(served: dict) -> str:
    """One line on the tflite variant's model; a quantised one is a different model."""
    text = f"tflite serves {served['quantization']} weights, {served['source']}"
    accuracy, reference = served.get("test_accuracy"), served.get("saved_model_test_accuracy")
    if accuracy is not None and reference is not None:
        text += f"; test accuracy {accuracy:.4f} against the SavedModel's {reference:.4f}"
    return text


def _tflite_input_names(version_dir: Path, model_name: str) -> dict[str, str]:
    """The SavedModel's input name -> the TFLite signature's (without signature metadata the
    converter names it after the graph tensor, e.g. serving_default_images)."""
    from convstack.serving.servable import load_version
    from convstack.serving.tflite import load_tflite_version

    version = int(version_dir.name)
    ours = list(load_version(model_name, version, version_dir).signature(SIGNATURE).inputs)
    served = list(
        load_tflite_version(model_name, version, version_dir, 1).signature(SIGNATURE).inputs
    )
    if set(ours) == set(served):
        return {}
    if len(ours) == len(served) == 1:
        return {ours[0]: served[0]}
    raise BenchError(f"the TFLite model's inputs {served} do not match the SavedModel's {ours}")


def _start_tflite(args, version_dir: Path, workdir: Path, threads) -> Variant:
    base = tflite_model_base(version_dir, workdir)
    flags = [*server_flags("unbatched", workdir, threads), "--prefer_tflite_model"]
    server = ServerProcess.start(args.model_name, base, workdir / "tflite.log", flags)
    names = _tflite_input_names(base / version_dir.name, args.model_name)
    return Variant("tflite", server, "grpc", flags, names)


def _start_kserve(args, version_dir: Path, workdir: Path, threads) -> list[Variant]:
    import tensorflow as tf

    from convstack.bench import peer

    if threads["intra_op"] != threads["inter_op"]:
        log.warning("the KServe peer runs with one pool size for both: %s", threads["intra_op"])
    python = peer.ensure_venv(tf.__version__)
    variants = []
    for kind, freeze in PEER_KINDS.items():
        server = peer.PeerProcess.start(
            python,
            args.model_name,
            version_dir,
            workdir / f"{kind}.log",
            gc_freeze=freeze,
            threads=threads["intra_op"],
        )
        flags = [f"kserve=={peer.KSERVE_VERSION}", *(["gc.freeze()"] if freeze else [])]
        variants.append(Variant(kind, server, "grpc-v2", flags))
    return variants


def stop_variants(variants: list[Variant]) -> dict[str, int]:
    """SIGTERM every server; their exit codes."""
    codes = {}
    for variant in variants:
        codes[variant.name] = variant.server.stop()
        if codes[variant.name] != 0:
            log.error(
                "the %s server exited with %s:\n%s",
                variant.name,
                codes[variant.name],
                variant.server.log_tail(),
            )
    return codes


# --- measurements -----------------------------------------------------------------------------


def shape_key(protocol: str, batch: int, concurrency: int) -> str:
    return f"{protocol}/b{batch}/c{concurrency}"


def _load_once(variant: Variant, protocol: str, args, inputs, concurrency: int):
    from convstack.client.loadgen import LoadSpec, run_load_sync

    spec = LoadSpec(
        target=variant.target(protocol),
        protocol=variant.wire_protocol(protocol),
        model_name=args.model_name,
        inputs=variant.inputs(inputs),
        concurrency=concurrency,
        duration=args.duration,
        warmup_requests=WARMUP_REQUESTS,
        rest_format="row",
    )

    def measure() -> dict:
        load = run_load_sync(spec)
        return {**load.to_json(), "images_per_second": load.throughput * len_rows(inputs)}

    return measure


def len_rows(inputs: dict[str, np.ndarray]) -> int:
    return len(next(iter(inputs.values())))


def add_cpu_per_request(record: dict) -> dict:
    """The server's and this process's CPU per OK request (ms) from a round's CPU seconds."""
    figures, cpu = record["figures"], record["cpu_seconds"]
    ok = figures.get("ok") or 0
    server = cpu["watched"].get("server")
    figures["server_cpu_ms_per_request"] = None if not ok or server is None else 1e3 * server / ok
    figures["client_cpu_ms_per_request"] = None if not ok else 1e3 * cpu["own"] / ok
    return record


def measure_shapes(args, variants: list[Variant], inputs_by_batch) -> dict[str, list[dict]]:
    """For each shape, every variant in interleaved rounds: {shape key: records}."""
    by_name = {variant.name: variant for variant in variants}
    results = {}
    for protocol in args.protocol_list:
        for batch, concurrency in args.shapes:
            key = shape_key(protocol, batch, concurrency)
            measures = {
                v.name: _load_once(v, protocol, args, inputs_by_batch[batch], concurrency)
                for v in variants
            }

            def report(record: dict, key=key) -> None:
                add_cpu_per_request(record)
                figures = record["figures"]
                log.info(
                    "%s %s round %d: %.0f req/s, p99 %s ms, server %s ms/req, other work %s "
                    "cores%s",
                    key,
                    record["variant"],
                    record["round"],
                    figures["throughput"],
                    _fmt(figures["latency_ms"]["p99"]),
                    _fmt(figures["server_cpu_ms_per_request"]),
                    _fmt(record["cores"]["other"]),
                    " (contended)" if record["contended"] else "",
                )

            results[key] = rounds_lib.run_rounds(
                measures,
                args.rounds,
                watch=lambda name: {"server": by_name[name].server.process.pid},
                contended_cores=args.contended_cores,
                reruns=args.reruns,
                on_round=report,
                groups=_batching_group(measures),
            )
    return results


def _batching_group(measured) -> list[tuple[str, ...]]:
    """The servers batching's goal compares, as one back-to-back group (if two or more run)."""
    group = tuple(name for name in BATCHING_GROUP if name in measured)
    return [group] if len(group) >= 2 and "unbatched" in group else []


# --- statistics and goals ---------------------------------------------------------------------


def summarize_shapes(records_by_shape: dict[str, list[dict]], names: list[str]) -> dict:
    """{shape key: {variant: summary}} with each figure's median and min-max."""
    return {
        key: {name: rounds_lib.summarize(records, name, SUMMARY_KEYS) for name in names}
        for key, records in records_by_shape.items()
    }


def _ours(names: list[str]) -> list[str]:
    return [name for name in names if name in OURS]


def compute_ratios(records_by_shape: dict[str, list[dict]], names: list[str]) -> dict:
    """Throughput ratios at each shape, round by round and of the medians: batched over
    unbatched, and each of ours over every peer kind."""
    ratios: dict = {}
    for key, records in records_by_shape.items():
        shape: dict = {}
        for other in ("batched", CONTROL):
            if {other, "unbatched"} <= set(names):
                shape[f"{other}/unbatched"] = rounds_lib.paired_ratio(
                    records, other, "unbatched", "throughput"
                )
        for ours in _ours(names):
            for peer in (name for name in names if name in PEER_KINDS):
                shape[f"{ours}/{peer}"] = rounds_lib.paired_ratio(records, ours, peer, "throughput")
        ratios[key] = shape
    return ratios


def _median(summary: dict, key: str) -> float | None:
    return summary[key]["median"]


def evaluate_goals(summaries: dict, floor: dict, names: list[str], ratios: dict) -> dict:
    """The goals at each shape: batching never slower than not batching; with a peer, the
    faster of ours at least GOAL_PEER_THROUGHPUT x KServe + gc.freeze with no higher p99;
    gRPC batch-1 concurrency-1 p50 within GOAL_OVERHEAD_MS of the floor. `ratios` is
    `compute_ratios`' answer."""
    goals: dict = {}
    for key, by_variant in summaries.items():
        shape_ratios = ratios.get(key, {})
        if "batched/unbatched" in shape_ratios:
            goals[f"batching_not_slower/{key}"] = _batching_goal(
                shape_ratios["batched/unbatched"], shape_ratios.get(f"{CONTROL}/unbatched")
            )
        if "kserve-gc-freeze" in by_variant:
            goals[f"ahead_of_kserve_gc_freeze/{key}"] = _peer_goal(by_variant, names)
    grpc_b1c1 = summaries.get(shape_key("grpc", 1, 1), {}).get("unbatched")
    if grpc_b1c1 and "1" in floor:
        p50 = _median(grpc_b1c1, "latency_ms.p50")
        overhead = None if p50 is None else p50 - floor["1"]["latency_ms"]["p50"]
        goals["grpc_batch1_p50_overhead_ms"] = {
            "target": f"< {GOAL_OVERHEAD_MS}",
            "measured": overhead,
            "met": overhead is not None and overhead < GOAL_OVERHEAD_MS,
        }
    return goals


def _batching_goal(pair: dict, control: dict | None = None) -> dict:
    """Batched over unbatched, judged round by round (the two run back to back in each round):
    slower only when the 95 % interval of the median ratio lies wholly below 1. Two servers of
    equal speed measure a median above or below 1 by chance; a demand that the point estimate
    reach 1 would pass or fail them at random, while a real gap of a few per cent over 20
    rounds puts the whole interval below 1. With a control (a second unbatched server), its
    ratio to the first is kept beside: the gap that two identical servers show."""
    interval = pair["per_round_median_interval"]
    same = None
    if control is not None:
        spread = control["per_round_median_interval"]
        same = {
            "measured": control["per_round"]["median"],
            "interval": [spread["low"], spread["high"]],
        }
    return {
        "control": same,
        "target": ">= 1.0 (the median of the round-by-round ratios; slower only if its 95 % "
        "interval lies below 1)",
        "measured": pair["per_round"]["median"],
        "interval": [interval["low"], interval["high"]],
        "of_medians": pair["of_medians"],
        "met": interval["high"] is not None and interval["high"] >= 1.0,
    }


def _peer_goal(by_variant: dict, names: list[str]) -> dict:
    peer = by_variant["kserve-gc-freeze"]
    peer_rps, peer_p99 = _median(peer, "throughput"), _median(peer, "latency_ms.p99")
    ours = [n for n in _ours(names) if _median(by_variant[n], "throughput") is not None]
    best = max(ours, key=lambda n: _median(by_variant[n], "throughput"), default=None)
    if best is None or not peer_rps:
        return {"target": f">= {GOAL_PEER_THROUGHPUT}x, p99 <=", "measured": None, "met": False}
    ratio = _median(by_variant[best], "throughput") / peer_rps
    p99 = _median(by_variant[best], "latency_ms.p99")
    return {
        "target": f">= {GOAL_PEER_THROUGHPUT}x throughput, p99 <= the peer's",
        "variant": best,
        "measured": ratio,
        "p99_ms": {"ours": p99, "peer": peer_p99},
        "met": ratio >= GOAL_PEER_THROUGHPUT
        and p99 is not None
        and peer_p99 is not None
        and p99 <= peer_p99,
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
        "note": f"the load generator (this Python process, asyncio) and every server share "
        f"these {cpus} CPUs; each round records the cores this process, the server under load "
        "and other work used. A client on its own machine would leave the server more",
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def server_threads(args: argparse.Namespace) -> dict[str, int]:
    """The TensorFlow thread pools every server runs with."""
    return {"intra_op": args.server_intra_op_threads, "inter_op": args.server_inter_op_threads}


def _floor_threads() -> dict[str, int]:
    import tensorflow as tf

    return {
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def _protocol_list(text: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PROTOCOLS]
    if unknown or not chosen:
        raise UsageError(f"--protocols takes grpc and/or rest, got {text!r}")
    return chosen


class UsageError(BenchError):
    """Arguments that parse but cannot run."""


def run_benchmark(args: argparse.Namespace) -> dict:
    """Every round, summary, ratio and goal as one JSON-ready dict."""
    from convstack.serving.servable import load_version

    args.protocol_list = _protocol_list(args.protocols)
    version, path = latest_version(Path(args.model_base), args.model_name)
    machine_before = rounds_lib.machine_state()
    log.info("benchmarking %s version %d (%s)", args.model_name, version, path)
    loaded = load_version(args.model_name, version, path)
    # TensorFlow's Python heap is large; without this, a full collection in this process (the
    # floor and the load generator) pauses it for ~0.2 s now and then.
    gc.freeze()
    batches = sorted({batch for batch, _ in args.shapes})
    inputs_by_batch = {b: make_inputs(loaded.signature(SIGNATURE), b) for b in batches}
    try:
        floor = {
            str(b): measure_floor(loaded, inputs_by_batch[b], min(args.duration, 2.0))
            for b in batches
        }
        with tempfile.TemporaryDirectory(prefix="convstack-bench-serve-") as workdir:
            variants = start_variants(args, path.parent, path, Path(workdir))
            try:
                reported = {
                    v.name: reported_threads(v.server.log_path.read_text(errors="replace"))
                    for v in variants
                    if v.name in SERVER_KINDS
                }
                records = measure_shapes(args, variants, inputs_by_batch)
            finally:
                exit_codes = stop_variants(variants)
    finally:
        gc.unfreeze()
    names = [v.name for v in variants]
    summaries = summarize_shapes(records, names)
    ratios = compute_ratios(records, names)
    return {
        "benchmark": "serve",
        "model": {"base": str(Path(args.model_base)), "name": args.model_name, "version": version},
        "duration_seconds": args.duration,
        "rounds": args.rounds,
        "reruns": args.reruns,
        "contended_cores": args.contended_cores,
        "warmup_requests": WARMUP_REQUESTS,
        "load": "closed loop (client.loadgen), one request per worker at a time; REST bodies in "
        'TF Serving\'s row format ({"instances": ...}), the same bytes to every server',
        "machine": machine_info() | {"before": machine_before, "after": rounds_lib.machine_state()},
        "batching_parameters": BATCHING_PARAMETERS,
        "tensorflow_threads": {
            "servers": server_threads(args),
            "floor": _floor_threads(),
            "note": "TensorFlow's intra-op and inter-op thread pools; 0: TensorFlow decides "
            "(about one thread per core each). Every server runs with the same; the floor runs "
            "in this process with TensorFlow's defaults",
        },
        "servers": {
            v.name: {
                "flags": v.flags,
                "grpc_protocol": v.grpc_protocol,
                "tensorflow_threads_reported": reported.get(v.name),
                "exit_code": exit_codes[v.name],
            }
            for v in variants
        },
        "floor": floor,
        "tflite": None if args.no_tflite else tflite_served(path),
        "summary": summaries,
        "ratios": ratios,
        "goals": evaluate_goals(summaries, floor, names, ratios),
        "rounds_by_shape": records,
    }


# --- output -----------------------------------------------------------------------------------


def _fmt(value, spec: str = ".2f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:{spec}}"
    )


def _range(figure: dict, spec: str) -> str:
    if figure["median"] is None:
        return "-"
    return f"{figure['median']:{spec}} [{figure['min']:{spec}}-{figure['max']:{spec}}]"


def summary_table(report: dict) -> str:
    """The printed summary: one row per shape and server (medians [min-max] over the rounds),
    then the ratios and goals."""
    header = (
        f"{'shape':<14}{'server':<18}{'req/s median [min-max]':>26}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'srv ms/req':>11}{'contended':>11}"
    )
    rows = [header, "-" * len(header)]
    for batch, floor in report["floor"].items():
        lat = floor["latency_ms"]
        rows.append(
            f"{'b' + batch:<14}{'in-process':<18}{_fmt(floor['throughput'], '.0f'):>26}"
            f"{_fmt(lat['p50']):>9}{_fmt(lat['p99']):>9}"
        )
    for key, by_variant in report["summary"].items():
        for name, summary in by_variant.items():
            rows.append(
                f"{key:<14}{name:<18}{_range(summary['throughput'], '.0f'):>26}"
                f"{_fmt(summary['latency_ms.p50']['median']):>9}"
                f"{_fmt(summary['latency_ms.p99']['median']):>9}"
                f"{_fmt(summary['server_cpu_ms_per_request']['median']):>11}"
                f"{summary['contended_rounds']:>6}/{summary['rounds']:<4}"
            )
    rows.append("")
    for key, ratios in report["ratios"].items():
        text = ", ".join(
            f"{name} {_fmt(r['of_medians'])}x [{_fmt(r['per_round']['min'])}-"
            f"{_fmt(r['per_round']['max'])}]"
            for name, r in ratios.items()
        )
        if text:
            rows.append(f"{key}: {text}")
    for name, goal in report["goals"].items():
        verdict = "met" if goal["met"] else "NOT met"
        rows.append(
            f"goal {name} {goal['target']}: measured {_fmt(goal['measured'])}"
            f"{_interval_text(goal.get('interval'))}, {verdict}{_control_text(goal.get('control'))}"
        )
    rows.append(_threads_text(report))
    if report.get("tflite"):
        rows.append(tflite_text(report["tflite"]))
    contended = sum(s["contended_rounds"] for v in report["summary"].values() for s in v.values())
    if contended:
        rows.append(
            f"{contended} rounds were measured while other work used more than "
            f"{report['contended_cores']} cores (flagged in the JSON): the figures are noisy"
        )
    return "\n".join(rows)


def _interval_text(interval: list | None) -> str:
    return "" if interval is None else f" [95 %: {_fmt(interval[0])}-{_fmt(interval[1])}]"


def _control_text(control: dict | None) -> str:
    if control is None:
        return ""
    return (
        f" (two identical unbatched servers: {_fmt(control['measured'])}"
        f"{_interval_text(control['interval'])})"
    )


def _threads_text(report: dict) -> str:
    def pools(threads: dict | None) -> str:
        return "unknown" if threads is None else f"{threads['intra_op']}/{threads['inter_op']}"

    threads = report["tensorflow_threads"]
    reported = ", ".join(
        f"{kind} {pools(server['tensorflow_threads_reported'])}"
        for kind, server in report["servers"].items()
        if kind in SERVER_KINDS
    )
    return (
        f"TensorFlow threads intra/inter-op (0: TensorFlow decides): servers "
        f"{pools(threads['servers'])} (reported: {reported}), in-process floor "
        f"{pools(threads['floor'])}"
    )


def write_plot(report: dict, path: Path) -> Path:
    """Median images/s and p99 latency per shape and server, with min-max bars (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, images, low, high, p99s = [], [], [], [], []
    for key, by_variant in report["summary"].items():
        for name, summary in by_variant.items():
            figure = summary["images_per_second"]
            labels.append(f"{key} {name}")
            images.append(figure["median"] or 0.0)
            low.append((figure["median"] or 0.0) - (figure["min"] or 0.0))
            high.append((figure["max"] or 0.0) - (figure["median"] or 0.0))
            p99s.append(summary["latency_ms.p99"]["median"] or 0.0)
    rows = np.arange(len(labels))
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 0.32 * len(labels) + 1.8), sharey=True)
    left.barh(rows, images, xerr=[low, high], color="tab:blue")
    left.set_xscale("log")
    left.set_xlabel("images / s, median and min-max of the rounds (log)")
    left.set_yticks(rows, labels, fontsize=8)
    left.invert_yaxis()
    right.barh(rows, p99s, color="tab:orange")
    right.set_xscale("log")
    right.set_xlabel("p99 latency, median of the rounds (ms, log)")
    machine = report["machine"]
    figure.suptitle(
        f"convstack serve: {report['model']['name']} v{report['model']['version']}, "
        f"{machine['cpus']} CPUs shared by client and servers, {report['rounds']} rounds",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def bench_main(argv: list[str]) -> int:
    """`convstack bench serve`: run, print the summary, save JSON and PNG. 0 when it ran (goals
    met or not), 2 for a missing model or unusable arguments, 1 if a server failed or did not
    exit cleanly, or the peer could not be set up."""
    args = build_parser().parse_args(argv)
    from convstack.common.logs import configure_logging

    configure_logging()
    from convstack.bench.peer import PeerSetupError

    try:
        report = run_benchmark(args)
    except (BenchError, ServerProcessError, PeerSetupError) as exc:
        print(f"convstack bench serve: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(exc, MissingModelError | UsageError) else 1
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
