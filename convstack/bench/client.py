"""`convstack bench client` (alias `convstack loadgen`): load a served model and measure the client.

Three sections, printed as tables (or JSON with `--json`) and saved to `--out`:

* load: closed loop (`--concurrency`) or open loop (`--rate`) for a `--duration` or a `--count`,
  over gRPC or REST (client.loadgen): throughput, latency p50/p90/p99/max, errors by status;
* codec: the client's numpy <-> TensorProto cost per request (encode the request's inputs, decode
  response-shaped outputs) against `tf.make_tensor_proto` + `tf.make_ndarray` on the same arrays;
* added latency (gRPC): median of interleaved `PredictionClient.predict` calls against raw
  `PredictionServiceStub.Predict` calls with a prebuilt request.

Request errors are results (exit 0); an unreachable server before the run exits 1 with one line
on stderr; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from convstack.client.cli import _one_line, _parse, _table, quiet_stderr
from convstack.common.files import write_json_atomic
from convstack.common.flags import positive_int, positive_number

if TYPE_CHECKING:
    from convstack.client.loadgen import LoadResult
    from convstack.client.signature import SignatureSpec

__all__ = ["bench_main", "build_parser", "measure_added_latency", "measure_codec"]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
DEFAULT_OUT = "bench-results/client.json"
PROBE_TIMEOUT = 5.0  # seconds for the metadata call that also tells whether the server is up
# Connectivity failures before the run (exit 1); any other answer means a server is there.
UNREACHABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Codec timing: repeats of a loop long enough for perf_counter's resolution not to matter.
CODEC_REPEATS = 7
CODEC_REPEAT_SECONDS = 0.02
WARMUP_CALLS = 3


class _Unreachable(Exception):
    """The server could not be reached before the run."""


class _Usage(Exception):
    """Arguments that parse but make no sense together."""


# --- arguments ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The flags of `convstack bench client`."""
    parser = argparse.ArgumentParser(
        prog="convstack bench client",
        description="Load a served model (closed or open loop) and measure the client's costs.",
    )
    parser.add_argument("--target", required=True, help="host:port (gRPC) or http://host:port")
    parser.add_argument("--protocol", choices=("grpc", "rest"), default="grpc")
    parser.add_argument("--model", required=True, help="model name on the server")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--version", type=int, help="a specific version")
    pick.add_argument("--label", help="a version label, e.g. stable or canary")
    parser.add_argument("--signature", default="serving_default")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="rows per request")
    parser.add_argument(
        "--npy",
        action="append",
        metavar="[NAME=]FILE",
        help="inputs from a .npy file (repeat for several inputs; default: random in [0, 1) "
        "shaped from the server's metadata)",
    )
    loop = parser.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=positive_int, help="closed loop: requests in flight")
    loop.add_argument("--rate", type=positive_number, help="open loop: requests per second")
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=positive_number, help="seconds of load (default 10)")
    stop.add_argument("--count", type=positive_int, help="requests to send")
    parser.add_argument("--timeout", type=positive_number, default=30.0, help="seconds per request")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=5,
        help="repeat the load this many times (each --duration or --count); the report gives "
        "the median round, the spread and every round with the machine's load (default 5)",
    )
    parser.add_argument(
        "--rest-format",
        choices=("columnar", "row"),
        default="columnar",
        help="REST body: columnar {'inputs': ...} or TF Serving's row format {'instances': ...}, "
        "which KServe's v1 protocol also reads (default columnar)",
    )
    parser.add_argument("--latency-calls", type=positive_int, default=50, help="per client")
    parser.add_argument("--no-tf-comparison", action="store_true", help="skip tf.make_* timing")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results ({DEFAULT_OUT})")
    parser.add_argument(
        "--footprint",
        action="store_true",
        help="measure the client's import time and installed size instead (see --footprint -h)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def _check_args(args) -> None:
    if args.protocol == "rest" and not args.target.startswith(("http://", "https://")):
        raise _Usage(f"--protocol rest needs an http:// target, got {args.target!r}")
    if args.protocol == "grpc" and args.target.startswith(("http://", "https://")):
        raise _Usage(f"--protocol grpc needs a host:port target, got {args.target!r}")


# --- the signature and the inputs -----------------------------------------------------------


def _grpc_signature(args) -> tuple[SignatureSpec | None, str | None]:
    """(the signature, None) or (None, the server's error) when the server answered."""
    from convstack.client.errors import PredictionError
    from convstack.client.signature import SignatureSpec
    from convstack.client.sync_client import PredictionClient

    client = PredictionClient(
        args.target,
        args.model,
        version=args.version,
        version_label=args.label,
        timeout=PROBE_TIMEOUT,
        retries=0,
    )
    with client:
        try:
            signatures = client.metadata()
        except PredictionError as error:
            if error.code in UNREACHABLE:
                raise _Unreachable(f"{args.target}: {error}") from None
            return None, str(error)
    if args.signature not in signatures:
        return None, f"no signature {args.signature!r}"
    return SignatureSpec.from_dict(args.signature, signatures[args.signature]), None


def _rest_metadata_url(args) -> str:
    from convstack.client.loadgen import rest_model_url

    return rest_model_url(args.target, args.model, args.version, args.label) + "/metadata"


def _rest_signature(args) -> tuple[SignatureSpec | None, str | None]:
    """As `_grpc_signature`, from the REST metadata endpoint (TF Serving's JSON)."""
    from google.protobuf import json_format

    from convstack.client._protos import get_model_metadata_pb2
    from convstack.client.signature import parse_signature_def_map

    try:
        with urllib.request.urlopen(_rest_metadata_url(args), timeout=PROBE_TIMEOUT) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as error:
        return None, f"HTTP_{error.code}: {error.read().decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as error:
        raise _Unreachable(f"{args.target}: {getattr(error, 'reason', error)}") from None
    signature_map = json_format.ParseDict(
        body["metadata"]["signature_def"],
        get_model_metadata_pb2.SignatureDefMap(),
        ignore_unknown_fields=True,
    )
    spec = parse_signature_def_map(signature_map).get(args.signature)
    return (spec, None) if spec else (None, f"no signature {args.signature!r}")


def _concrete_shape(shape: Sequence[int] | None, batch_size: int) -> tuple[int, ...]:
    """The signature's shape with the batch dimension set and any other free one at 1."""
    if shape is None:
        raise _Usage("an input of unknown rank: give its values with --npy")
    dims = [batch_size if i == 0 and d == -1 else max(d, 1) for i, d in enumerate(shape)]
    return tuple(dims)


def random_arrays(tensors: dict, batch_size: int, rng: np.random.Generator) -> dict:
    """Arrays uniform in [0, 1) (cast to each tensor's numeric dtype) of the signature's shapes."""
    arrays = {}
    for name, tensor in tensors.items():
        if tensor.dtype == "string":
            raise _Usage(f"input {name!r} is a string: give its values with --npy")
        shape = _concrete_shape(tensor.shape, batch_size)
        arrays[name] = rng.uniform(0, 1, size=shape).astype(tensor.dtype)
    return arrays


def _rows(array: np.ndarray, batch_size: int) -> np.ndarray:
    """`batch_size` rows of `array`, cycling through them if it has fewer."""
    if array.ndim == 0:
        raise _Usage("a .npy input needs a batch dimension")
    return array[np.arange(batch_size) % len(array)]


def npy_inputs(values: Sequence[str], spec: SignatureSpec | None, batch_size: int) -> dict:
    """{name: batch_size rows} from `--npy [NAME=]FILE` values; an unnamed file feeds the
    signature's only input."""
    inputs = {}
    for value in values:
        name, _, path = value.rpartition("=")
        if not name:
            if spec is None or len(spec.inputs) != 1:
                raise _Usage(f"name the input of {path}: --npy NAME={path}")
            name = next(iter(spec.inputs))
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise _Usage(f"{path}: not a readable .npy array: {error}") from None
        inputs[name] = _rows(array, batch_size)
    return inputs


# --- measurements ---------------------------------------------------------------------------


def _per_call_us(call: Callable[[], object]) -> float:
    """Median microseconds per call over CODEC_REPEATS loops of CODEC_REPEAT_SECONDS each."""
    number, started = 0, time.perf_counter()
    while time.perf_counter() - started < CODEC_REPEAT_SECONDS:
        call()
        number += 1
    timings = []
    for _ in range(CODEC_REPEATS):
        started = time.perf_counter()
        for _ in range(number):
            call()
        timings.append((time.perf_counter() - started) / number)
    return statistics.median(timings) * 1e6


def _tensorflow_installed() -> bool:
    """Whether TensorFlow's codec can be compared (a client-only install has none)."""
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def _tensorflow_codec() -> tuple[Callable, Callable]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_stderr():
        import tensorflow as tf
    return tf.make_tensor_proto, tf.make_ndarray


def _ratio(slow: float, fast: float) -> float | None:
    return slow / fast if fast > 0 else None


def measure_codec(inputs: dict, outputs: dict, *, tensorflow: bool = True) -> dict:
    """Microseconds per request to encode `inputs` and decode `outputs` (as TensorProtos the
    server would send), by the client and (if `tensorflow`) by tf.make_tensor_proto /
    tf.make_ndarray, totalled and by dtype; `ratio` is TensorFlow's time over the client's."""
    from convstack.client.tensors import to_ndarray, to_tensor_proto

    encoders = {"client": to_tensor_proto}
    decoders = {"client": to_ndarray}
    if tensorflow:
        encoders["tensorflow"], decoders["tensorflow"] = _tensorflow_codec()
    protos = {name: to_tensor_proto(array) for name, array in outputs.items()}
    steps = [("encode", array, encoders, array) for array in inputs.values()]
    steps += [("decode", outputs[name], decoders, proto) for name, proto in protos.items()]
    report: dict = {who: {"encode_us": 0.0, "decode_us": 0.0} for who in encoders}
    by_dtype: dict = {}
    for step, array, functions, argument in steps:
        dtype = by_dtype.setdefault(str(array.dtype), dict.fromkeys(functions, 0.0))
        for who, function in functions.items():
            micros = _per_call_us(lambda f=function, a=argument: f(a))
            report[who][f"{step}_us"] += micros
            dtype[who] += micros
    for figures in report.values():
        figures["total_us"] = figures["encode_us"] + figures["decode_us"]
    if tensorflow:
        report["ratio"] = _ratio(report["tensorflow"]["total_us"], report["client"]["total_us"])
        for figures in by_dtype.values():
            figures["ratio"] = _ratio(figures["tensorflow"], figures["client"])
    report["by_dtype_us"] = by_dtype
    report["shapes"] = {
        "inputs": {name: list(array.shape) for name, array in inputs.items()},
        "outputs": {name: list(array.shape) for name, array in outputs.items()},
    }
    return report


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure_added_latency(args, inputs: dict, calls: int) -> dict:
    """Median ms of `calls` PredictionClient.predict calls and as many raw stub calls with a
    prebuilt request, interleaved so that both see the same server and machine."""
    import grpc

    from convstack.client._protos import predict_pb2, prediction_service_pb2_grpc
    from convstack.client.errors import PredictionError
    from convstack.client.loadgen import LoadSpec, predict_request_bytes
    from convstack.client.sync_client import PredictionClient

    spec = LoadSpec(
        args.target, "grpc", args.model, inputs, args.signature, args.version, args.label, count=1
    )
    request = predict_pb2.PredictRequest.FromString(predict_request_bytes(spec))
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    client = PredictionClient(
        args.target,
        args.model,
        version=args.version,
        version_label=args.label,
        signature=args.signature,
        timeout=args.timeout,
        retries=0,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )
    with client, grpc.insecure_channel(args.target, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def predict() -> object:
            return client.predict(inputs)

        def raw() -> object:
            return stub.Predict(request, timeout=args.timeout)

        try:
            for _ in range(WARMUP_CALLS):  # connection, cached signature, server warm-up
                predict(), raw()
            pairs = [(_timed(predict), _timed(raw)) for _ in range(calls)]
        except PredictionError as error:
            return {"error": error.code, "message": error.message}
        except grpc.RpcError as error:
            return {"error": error.code().name, "message": error.details()}
    client_ms = statistics.median(pair[0] for pair in pairs) * 1e3
    raw_ms = statistics.median(pair[1] for pair in pairs) * 1e3
    return {
        "calls": calls,
        "client_ms": client_ms,
        "raw_stub_ms": raw_ms,
        "added_ms": client_ms - raw_ms,
    }


# --- the run --------------------------------------------------------------------------------


def _inputs_and_outputs(args, spec: SignatureSpec | None, error: str | None) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    if args.npy:
        inputs = npy_inputs(args.npy, spec, args.batch_size)
    elif spec is None:
        raise _Unreachable(f"{args.target}: cannot shape inputs from metadata ({error})")
    else:
        inputs = random_arrays(spec.inputs, args.batch_size, rng)
    try:
        outputs = random_arrays(spec.outputs, args.batch_size, rng) if spec else {}
    except _Usage:  # string outputs: only the request side can be timed
        outputs = {}
    return inputs, outputs or dict(inputs)


def _load(args, inputs: dict) -> LoadResult:
    from convstack.client.loadgen import LoadSpec, run_load_sync

    try:
        spec = LoadSpec(
            target=args.target,
            protocol=args.protocol,
            model_name=args.model,
            inputs=inputs,
            signature_name=args.signature,
            version=args.version,
            version_label=args.label,
            concurrency=args.concurrency,
            rate=args.rate,
            duration=args.duration,
            count=args.count,
            timeout=args.timeout,
            rest_format=args.rest_format,
        )
    except ValueError as error:
        raise _Usage(str(error)) from None
    log.info("load: %s", spec)
    return run_load_sync(spec)


def _load_rounds(args, inputs: dict) -> tuple[dict, dict]:
    """The load `args.rounds` times (convstack/bench/rounds.py: machine and own CPU around
    each): the median round by throughput, and the rounds with their spread."""
    from convstack.bench import rounds

    records = rounds.run_rounds(
        {"load": lambda: _load(args, inputs).to_json()},
        args.rounds,
        on_round=lambda r: log.info(
            "round %d: %.1f/s%s",
            r["round"],
            r["figures"]["throughput"],
            " (contended)" if r["contended"] else "",
        ),
    )
    keys = ["throughput", "latency_ms.p50", "latency_ms.p99"]
    summary = rounds.summarize(records, "load", keys)
    ordered = sorted(records, key=lambda r: r["figures"]["throughput"])
    median = ordered[(len(ordered) - 1) // 2]["figures"]
    return median, {"summary": summary, "rounds": records, "machine": rounds.machine_state()}


def run(args) -> dict:
    """Every section of the report for parsed `args` (raises _Unreachable or _Usage)."""
    _check_args(args)
    fetch = _grpc_signature if args.protocol == "grpc" else _rest_signature
    spec, metadata_error = fetch(args)
    inputs, outputs = _inputs_and_outputs(args, spec, metadata_error)
    load, load_rounds = _load_rounds(args, inputs)
    report = {
        "target": args.target,
        "protocol": args.protocol,
        "model": args.model,
        "version": args.version,
        "label": args.label,
        "signature": args.signature,
        "batch_size": args.batch_size,
        "mode": "open" if args.rate else "closed",
        "metadata_error": metadata_error,
        "load": load,
        "load_rounds": load_rounds,
        "codec": measure_codec(
            inputs, outputs, tensorflow=not args.no_tf_comparison and _tensorflow_installed()
        ),
    }
    if args.protocol == "grpc":
        report["added_latency"] = measure_added_latency(args, inputs, args.latency_calls)
    else:
        report["added_latency"] = {"skipped": "gRPC only"}
    return report


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rounds_line(summary: dict) -> str:
    def spread(key: str, digits: int) -> str:
        figure = summary[key]
        if figure["median"] is None:
            return "-"
        return (
            f"{figure['median']:.{digits}f} [{figure['min']:.{digits}f}-{figure['max']:.{digits}f}]"
        )

    return (
        f"over the rounds, median [min-max]: throughput/s {spread('throughput', 1)}, p50 ms "
        f"{spread('latency_ms.p50', 2)}, p99 ms {spread('latency_ms.p99', 2)}; "
        f"{summary['contended_rounds']} of {summary['rounds']} rounds had other work on the cores"
    )


def format_report(report: dict) -> str:
    """The report as perf_analyzer-style tables."""
    load = report["load"]
    loop = report["mode"]
    lines = [
        f"{report['model']} at {report['target']} ({report['protocol']}, batch "
        f"{report['batch_size']}, {loop} loop): {load['requests']} requests, {load['ok']} OK "
        f"in {load['seconds']:.2f} s, {load['late']} late (the median of "
        f"{report['load_rounds']['summary']['rounds']} rounds)",
        _rounds_line(report["load_rounds"]["summary"]),
        "",
    ]
    latency = load["latency_ms"]
    header = ["throughput/s", "p50 ms", "p90 ms", "p99 ms", "max ms"]
    row = [_number(load["throughput"], 1)] + [
        _number(latency[k]) for k in ("p50", "p90", "p99", "max")
    ]
    lines += [_table(header, [row], right=range(5)), ""]
    errors = [[code, str(count)] for code, count in load["errors"].items()]
    lines += [_table(["error", "count"], errors or [["none", "0"]], right=[1]), ""]
    codec = report["codec"]
    who = [name for name in ("client", "tensorflow") if name in codec]
    rows = [
        [name, *(_number(codec[name][k], 1) for k in ("encode_us", "decode_us", "total_us"))]
        for name in who
    ]
    lines.append(_table(["codec", "encode us", "decode us", "total us"], rows, right=[1, 2, 3]))
    if "ratio" in codec:
        by_dtype = ", ".join(
            f"{dtype} {_number(figures['ratio'])}x"
            for dtype, figures in codec["by_dtype_us"].items()
        )
        lines.append(f"tensorflow / client: {_number(codec['ratio'])}x ({by_dtype})")
    added = report["added_latency"]
    if "added_ms" in added:
        lines.append(
            f"\nmedian latency over {added['calls']} calls: client {added['client_ms']:.3f} ms, "
            f"raw stub {added['raw_stub_ms']:.3f} ms, added {added['added_ms']:.3f} ms"
        )
    else:
        lines.append(f"\nadded latency: {added.get('skipped') or added.get('error')}")
    return "\n".join(lines)


def _save(report: dict, out: str) -> None:
    write_json_atomic(out, report, sort_keys=False)


def bench_main(argv: list[str]) -> int:
    """`convstack bench client`: 0 when the run completed (request errors included), 1 for a
    server unreachable before the run, 2 for usage errors. `--footprint` measures the client's
    import time and installed size instead (convstack/bench/footprint.py, its flags follow)."""
    if "--footprint" in argv:
        from convstack.bench import footprint

        return footprint.bench_main([word for word in argv if word != "--footprint"])
    args = _parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_stderr():  # --saved-model's TensorFlow, if any, talks on stderr
        import convstack.client.loadgen
        import convstack.client.sync_client  # noqa: F401
    prog = "convstack bench client"
    try:
        report = run(args)
    except _Usage as error:
        print(f"{prog}: error: {_one_line(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except _Unreachable as error:
        print(f"{prog}: error: {_one_line(str(error))}", file=sys.stderr)
        return EXIT_ERROR
    _save(report, args.out)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return EXIT_OK
