"""`convstack bench infer`: every in-process inference path of one exported version, on the same
test images, at batch 1 and 32, in one process. A benchmark, not a test: it reports, never
fails on a number.

Variants (all return the classes the SavedModel's `serving_default` returns):

* `saved_model`: tf.saved_model.load and its `serving_default` signature (the reference);
* `session`: the same SavedModel as the embedded server runs it (a TF1 session, serving/);
* `xla`: `serving_default` under tf.function(jit_compile=True) (XLA on CPU);
* `keras_call` / `keras_predict`: keras.models.load_model on `assets.extra/model.keras`,
  then `model(x, training=False)` with softmax, or `model.predict(x)`;
* `tflite_<kind>` for float32, float16 and int8, converted here from the version's SavedModel
  as `convstack train --tflite KIND` would: one tf.lite.Interpreter allocated for the batch;
* `tflite_<kind>_pool`: the server's pool (serving/tflite.py, --prefer_tflite_model) of
  `--pool-size` interpreters driven by as many threads at once.

Each variant at each batch is measured for `--seconds` per round, `--rounds` rounds, the
variants' order rotated round by round (convstack/bench/rounds.py); every round keeps its load
average and this process's CPU. The report gives each figure's median and min-max, and each
variant's ratio to `saved_model` at the same batch, round by round and of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from convstack.bench import rounds
from convstack.common.files import write_json_atomic
from convstack.common.flags import positive_int, positive_number

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
REFERENCE = "saved_model"
TFLITE_KINDS = ("float32", "float16", "int8")
VARIANTS = (
    "saved_model",
    "session",
    "xla",
    "keras_call",
    "keras_predict",
    *(f"tflite_{kind}" for kind in TFLITE_KINDS),
    *(f"tflite_{kind}_pool" for kind in TFLITE_KINDS),
)
# The goal of issue #13: the best path at least 3x the SavedModel's batch-1 images/s with test
# accuracy within 0.5 points.
GOAL_SPEEDUP = 3.0
GOAL_ACCURACY_POINTS = 0.5
MIN_CALLS = 3
WARMUP_CALLS = 3


class BenchError(Exception):
    """The benchmark cannot run (no model, unreadable data); one line for the user."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convstack bench infer",
        description="In-process inference of one exported version: SavedModel, XLA, TFLite "
        "float32/float16/int8 (one interpreter and the server's pool) and the Keras model, "
        "p50/p99 latency, images/s and test accuracy, at each batch size.",
    )
    parser.add_argument("--model-base", default="models", help="model repository root")
    parser.add_argument("--model-name", default="digits", help="model name")
    parser.add_argument(
        "--version", type=positive_int, help="version to measure (default: the highest)"
    )
    parser.add_argument(
        "--data",
        help="dataset URI of the test split (default: the one the version's model card names, "
        "split with the card's seed and fractions)",
    )
    parser.add_argument("--batches", default="1,32", help="batch sizes (default: 1,32)")
    parser.add_argument(
        "--rounds", type=positive_int, default=5, help="rounds per variant (default: 5)"
    )
    parser.add_argument(
        "--seconds",
        type=positive_number,
        default=0.4,
        help="timed seconds per variant, batch and round (default: 0.4)",
    )
    parser.add_argument(
        "--pool-size",
        type=positive_int,
        default=len(os.sched_getaffinity(0)),
        help="TFLite interpreters in the pool, and threads driving it (default: the CPUs)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} ({REFERENCE} is always measured)",
    )
    parser.add_argument(
        "--out",
        default="bench-results/infer.json",
        help="JSON output; the plot is written next to it as .png",
    )
    return parser


# --- the version, its data --------------------------------------------------------------------


def version_dir(model_base: Path, model_name: str, version: int | None) -> Path:
    """The version's directory (the highest when `version` is None); BenchError if missing."""
    model_dir = Path(model_base) / model_name
    if version is not None:
        path = model_dir / str(version)
        if not (path / "saved_model.pb").is_file():
            raise BenchError(f"{path}: no exported version there (no saved_model.pb)")
        return path
    versions = sorted(
        int(p.name) for p in (model_dir.iterdir() if model_dir.is_dir() else ()) if p.name.isdigit()
    )
    if not versions:
        raise BenchError(
            f"no exported version under {model_dir}: run `convstack train --model-base "
            f"{model_base} --model-name {model_name}` first, or pass --model-base/--model-name"
        )
    return model_dir / str(versions[-1])


def test_split(card: dict, data: str | None) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(uri, test images, test labels, calibration images) as the version was trained: the
    card's dataset and split unless `data` names another."""
    from convstack.trainer.data import load_dataset

    config = card.get("training", {}).get("config", {})
    uri = data or config.get("data") or card.get("dataset", {}).get("uri")
    if not uri:
        raise BenchError("the model card names no dataset; pass --data URI")
    split = {
        key: config[key]
        for key in ("seed", "validation_fraction", "test_fraction")
        if key in config
    }
    try:
        dataset = load_dataset(uri, **split)
    except Exception as exc:  # DataError and what the readers raise
        raise BenchError(f"{uri}: cannot load the test split: {exc}") from exc
    fingerprint = card.get("dataset", {}).get("fingerprint")
    if fingerprint and dataset.info.fingerprint != fingerprint:
        log.warning("%s: fingerprint differs from the model card's (%s)", uri, fingerprint)
    images, labels = dataset.arrays("test")
    if len(images) == 0:
        raise BenchError(f"{uri}: the test split is empty")
    calibration, _ = dataset.arrays("train", limit=200)
    return uri, np.asarray(images, np.float32), np.asarray(labels), np.asarray(calibration)


# --- variants: a classify function (accuracy) and a timed call per batch ----------------------


class Variant:
    """One inference path: `prepare(batch)` returns the function the rounds time (one call on
    one batch of images); `classify(images)` gives int64 classes for the accuracy."""

    def __init__(
        self,
        name: str,
        description: str,
        classify: Callable,
        prepare: Callable,
        keep=None,
        size_bytes: int | None = None,
    ):
        self.size_bytes = size_bytes
        self.name = name
        self.description = description
        self.classify = classify
        self.prepare = prepare
        # What must outlive the functions: a loaded SavedModel's signature functions fail
        # once its object (holding the variables) is collected.
        self.keep = keep


def _softmax_classes(logits) -> np.ndarray:
    import tensorflow as tf

    probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
    return tf.argmax(probabilities, axis=-1).numpy()


def _saved_model_variants(path: Path) -> list[Variant]:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    serve = loaded.signatures["serving_default"]
    xla = tf.function(lambda images: serve(images=images), jit_compile=True)

    def calling(function):
        def classify(images):
            return function(tf.constant(images))["classes"].numpy()

        return classify

    reference = calling(lambda images: serve(images=images))
    return [
        Variant(
            "saved_model",
            "tf.saved_model.load, serving_default(images=tf.constant(x))",
            reference,
            lambda batch: reference,
            keep=loaded,
        ),
        Variant(
            "xla",
            "serving_default wrapped in tf.function(jit_compile=True)",
            calling(xla),
            lambda batch: calling(xla),
            keep=loaded,
        ),
    ]


def _session_variant(path: Path) -> Variant:
    from convstack.serving.servable import load_version

    version = load_version("bench", 1, path)

    def classify(images):
        return version.run("serving_default", {"images": images})["classes"]

    return Variant(
        "session",
        "the embedded server's SavedModel session (serving/servable.py LoadedVersion.run)",
        classify,
        lambda batch: classify,
    )


def _keras_variants(path: Path) -> list[Variant]:
    import keras
    import tensorflow as tf

    model = keras.models.load_model(path, compile=False)

    def call(images):
        return _softmax_classes(model(tf.constant(images), training=False))

    def predict(images):
        return _softmax_classes(model.predict(images, verbose=0, batch_size=len(images)))

    return [
        Variant(
            "keras_call",
            "keras.models.load_model(model.keras), model(x, training=False), softmax",
            call,
            lambda batch: call,
        ),
        Variant(
            "keras_predict",
            "keras.models.load_model(model.keras), model.predict(x), softmax",
            predict,
            lambda batch: predict,
        ),
    ]


def _tflite_single(buffer: bytes, batch: int) -> Callable:
    """A call on one interpreter allocated for `batch` rows."""
    from convstack.trainer import tflite_export

    # The tensor indices, from a throwaway interpreter: a signature runner keeps references
    # to its interpreter's tensors, which then refuses to be resized.
    runner = tflite_export.interpreter(buffer).get_signature_runner("serving_default")
    inputs = runner.get_input_details()["images"]
    outputs = runner.get_output_details()["classes"]
    interpreter = tflite_export.interpreter(buffer)
    shape = [batch, *inputs["shape_signature"][1:]]
    interpreter.resize_tensor_input(inputs["index"], shape, strict=False)
    interpreter.allocate_tensors()

    def call(images):
        interpreter.set_tensor(inputs["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(outputs["index"])

    return call


def _tflite_variants(kind: str, buffer: bytes, pool_size: int) -> list[Variant]:
    from convstack.trainer import tflite_export

    def classify(images):
        return tflite_export.predict_classes(buffer, images)

    def pool(batch):
        from convstack.serving.tflite import TfLiteVersion

        version = TfLiteVersion("bench", 1, Path("."), buffer, pool_size)
        signature = version.signature_def_map().signature_def["serving_default"]
        feed, fetch = signature.inputs["images"].name, signature.outputs["classes"].name
        return _PoolCall(version, feed, fetch, pool_size)

    return [
        Variant(
            f"tflite_{kind}",
            f"TFLite {kind}, one tf.lite.Interpreter allocated for the batch",
            classify,
            lambda batch: _tflite_single(buffer, batch),
            size_bytes=len(buffer),
        ),
        Variant(
            f"tflite_{kind}_pool",
            f"TFLite {kind}, the server's pool of {pool_size} interpreters, {pool_size} "
            "threads at once",
            classify,
            pool,
            size_bytes=len(buffer),
        ),
    ]


class _PoolCall:
    """Marks a timed call that runs from several threads at once (see _time_pool)."""

    def __init__(self, version, feed: str, fetch: str, threads: int):
        self.threads = threads
        self._version, self._feed, self._fetch = version, feed, fetch

    def __call__(self, images):
        return self._version.run_tensors({self._feed: images}, [self._fetch])[0]


def _convert_all(path: Path, calibration: np.ndarray, kinds) -> dict[str, bytes]:
    from convstack.trainer import tflite_export

    return {kind: tflite_export.convert_for_serving(path, kind, calibration) for kind in kinds}


def build_variants(
    path: Path, calibration: np.ndarray, wanted: set[str], pool_size: int
) -> dict[str, Variant]:
    """The variants named in `wanted` (plus the reference) for the version at `path`."""
    wanted = wanted | {REFERENCE}
    variants: list[Variant] = list(_saved_model_variants(path))
    if "session" in wanted:
        variants.append(_session_variant(path))
    keras_file = path / "assets.extra" / "model.keras"
    if {"keras_call", "keras_predict"} & wanted:
        if not keras_file.is_file():
            raise BenchError(f"{keras_file}: no Keras model file (exported before it existed?)")
        variants += _keras_variants(keras_file)
    kinds = [k for k in TFLITE_KINDS if {f"tflite_{k}", f"tflite_{k}_pool"} & wanted]
    with _quiet_converter():
        buffers = _convert_all(path, calibration, kinds)
    for kind, buffer in buffers.items():
        variants += _tflite_variants(kind, buffer, pool_size)
    return {v.name: v for v in variants if v.name in wanted}


@contextlib.contextmanager
def _quiet_converter():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- timing ------------------------------------------------------------------------------------


def latency_figures(latencies: list[float], images: int, seconds: float) -> dict:
    """calls, p50/p99 latency (ms) and images/s of one measurement."""
    values = np.asarray(latencies) * 1000.0
    return {
        "calls": len(latencies),
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "images_per_second": images / seconds,
    }


def _time_single(call: Callable, batches: list[np.ndarray], seconds: float) -> dict:
    latencies = []
    started = time.perf_counter()
    while len(latencies) < MIN_CALLS or time.perf_counter() - started < seconds:
        batch = batches[len(latencies) % len(batches)]
        begin = time.perf_counter()
        call(batch)
        latencies.append(time.perf_counter() - begin)
    elapsed = time.perf_counter() - started
    return latency_figures(latencies, len(latencies) * len(batches[0]), elapsed)


def _time_pool(call: _PoolCall, batches: list[np.ndarray], seconds: float) -> dict:
    per_thread: list[list[float]] = [[] for _ in range(call.threads)]
    start = threading.Barrier(call.threads + 1)

    def worker(index: int) -> None:
        latencies = per_thread[index]
        start.wait()
        deadline = time.perf_counter() + seconds
        while len(latencies) < MIN_CALLS or time.perf_counter() < deadline:
            batch = batches[(len(latencies) + index) % len(batches)]
            begin = time.perf_counter()
            call(batch)
            latencies.append(time.perf_counter() - begin)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(call.threads)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies = [value for values in per_thread for value in values]
    return latency_figures(latencies, len(latencies) * len(batches[0]), elapsed)


def timed(call: Callable, batches: list[np.ndarray], seconds: float) -> Callable[[], dict]:
    """The measurement of one variant at one batch size: warmed up now, timed when called."""
    for batch in batches[:WARMUP_CALLS]:
        call(batch)
    if isinstance(call, _PoolCall):
        return lambda: _time_pool(call, batches, seconds)
    return lambda: _time_single(call, batches, seconds)


def batches_of(images: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive full batches of `size` test images (at least one: the images repeat)."""
    if len(images) < size:
        images = np.resize(images, (size, *images.shape[1:]))
    count = len(images) // size
    return [np.ascontiguousarray(images[i * size : (i + 1) * size]) for i in range(count)]


# --- accuracy, the run, the report --------------------------------------------------------------


def accuracies(
    variants: dict[str, Variant], images: np.ndarray, labels: np.ndarray
) -> dict[str, dict]:
    """Each variant's test accuracy and its class agreement with the reference."""
    classes = {}
    for name, variant in variants.items():
        pieces = [
            variant.classify(np.ascontiguousarray(images[start : start + 32]))
            for start in range(0, len(images), 32)
        ]
        classes[name] = np.concatenate([np.asarray(p).reshape(-1) for p in pieces])
    reference = classes[REFERENCE]
    return {
        name: {
            "accuracy": float(np.mean(found == labels)),
            "class_agreement": float(np.mean(found == reference)),
        }
        for name, found in classes.items()
    }


def key(name: str, batch: int) -> str:
    return f"{name}@b{batch}"


FIGURES = ("p50_ms", "p99_ms", "images_per_second")


def summarize(records: list[dict], names: list[str], batches: list[int]) -> list[dict]:
    """Per variant and batch: each figure's median and min-max, and the ratios to the
    reference at the same batch (images/s: higher is faster; p50: lower is faster)."""
    results = []
    for batch in batches:
        for name in names:
            entry = {"variant": name, "batch": batch}
            entry.update(rounds.summarize(records, key(name, batch), FIGURES))
            entry["images_per_second_ratio"] = rounds.paired_ratio(
                records, key(name, batch), key(REFERENCE, batch), "images_per_second"
            )
            entry["p50_ratio"] = rounds.paired_ratio(
                records, key(name, batch), key(REFERENCE, batch), "p50_ms"
            )
            results.append(entry)
    return results


def evaluate_goal(results: list[dict], accuracy: dict[str, dict]) -> dict:
    """The fastest variant at batch 1 whose accuracy is within 0.5 points of the reference's,
    and whether it reaches 3x the reference's images/s (median of the per-round ratios)."""
    reference = accuracy[REFERENCE]["accuracy"]
    eligible = [
        r
        for r in results
        if r["batch"] == 1
        and r["variant"] != REFERENCE
        and abs(accuracy[r["variant"]]["accuracy"] - reference) * 100 <= GOAL_ACCURACY_POINTS
        and r["images_per_second_ratio"]["per_round"]["median"] is not None
    ]
    if not eligible:
        return {"best": None, "met": False}
    best = max(eligible, key=lambda r: r["images_per_second_ratio"]["per_round"]["median"])
    speedup = best["images_per_second_ratio"]["per_round"]["median"]
    return {
        "target": f">= {GOAL_SPEEDUP}x {REFERENCE} batch-1 images/s, accuracy within "
        f"{GOAL_ACCURACY_POINTS} points",
        "best": best["variant"],
        "speedup": speedup,
        "accuracy_points_difference": (accuracy[best["variant"]]["accuracy"] - reference) * 100,
        "met": speedup >= GOAL_SPEEDUP,
    }


def _wanted(text: str) -> set[str]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(VARIANTS))
    if unknown:
        raise BenchError(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    return names


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise BenchError(f"--batches: not a list of integers: {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise BenchError(f"--batches: sizes must be positive integers, got {text!r}")
    return sizes


def run_benchmark(args: argparse.Namespace) -> dict:
    wanted, batch_sizes = _wanted(args.variants), _batch_sizes(args.batches)
    path = version_dir(Path(args.model_base), args.model_name, args.version)
    card_file = path / "assets.extra" / "model_card.json"
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    uri, images, labels, calibration = test_split(card, args.data)
    import tensorflow as tf

    machine_before = rounds.machine_state()
    variants = build_variants(path, calibration, wanted, args.pool_size)
    accuracy = accuracies(variants, images, labels)
    measurements = {}
    for batch in batch_sizes:
        batches = batches_of(images, batch)
        for name, variant in variants.items():
            measurements[key(name, batch)] = timed(variant.prepare(batch), batches, args.seconds)

    def progress(record: dict) -> None:
        log.info(
            "round %d %s: %.0f images/s, p50 %.3f ms (load %s)",
            record["round"],
            record["variant"],
            record["figures"]["images_per_second"],
            record["figures"]["p50_ms"],
            record["load_average"],
        )

    # Contended rounds (other work over DEFAULT_CONTENDED_CORES) are flagged and kept: on a
    # shared machine a rerun would rarely find it quieter.
    records = rounds.run_rounds(measurements, args.rounds, on_round=progress)
    names = list(variants)
    results = summarize(records, names, batch_sizes)
    return {
        "benchmark": "infer",
        "version_dir": str(path),
        "data": uri,
        "test_examples": len(labels),
        "settings": {
            "batches": batch_sizes,
            "rounds": args.rounds,
            "seconds_per_measurement": args.seconds,
            "pool_size": args.pool_size,
        },
        "machine": {
            **machine_before,
            "load_average_after": rounds.machine_state()["load_average"],
            "tensorflow": tf.__version__,
            "tensorflow_threads": {
                "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
            },
        },
        "model_card": {
            "test_metrics": card.get("test_metrics"),
            "tflite": card.get("tflite"),
        },
        "variants": {
            name: {
                "description": variants[name].description,
                "size_bytes": variants[name].size_bytes,
                **accuracy[name],
            }
            for name in names
        },
        "results": results,
        "goal": evaluate_goal(results, accuracy),
        "rounds": records,
    }


# --- output ------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(report: dict) -> str:
    header = (
        f"{'variant':<20} {'batch':>5} {'p50 ms':>9} {'p99 ms':>9} {'images/s':>10} "
        f"{'min-max':>17} {'x saved':>8} {'accuracy':>8} {'load':>5}"
    )
    lines = [header]
    for entry in report["results"]:
        speed = entry["images_per_second"]
        ratio = entry["images_per_second_ratio"]["per_round"]["median"]
        accuracy = report["variants"][entry["variant"]]["accuracy"]
        loads = [
            r["load_average"][0]
            for r in report["rounds"]
            if r["variant"] == key(entry["variant"], entry["batch"]) and r["load_average"]
        ]
        lines.append(
            f"{entry['variant']:<20} {entry['batch']:>5} "
            f"{_fmt(entry['p50_ms']['median'], '.3f'):>9} "
            f"{_fmt(entry['p99_ms']['median'], '.3f'):>9} "
            f"{_fmt(speed['median'], '.0f'):>10} "
            f"{_fmt(speed['min'], '.0f') + '-' + _fmt(speed['max'], '.0f'):>17} "
            f"{_fmt(ratio, '.2f'):>8} {accuracy:>8.4f} "
            f"{_fmt(float(np.median(loads)) if loads else None, '.1f'):>5}"
        )
    goal = report["goal"]
    lines.append(
        f"\ngoal ({goal.get('target', '')}): best {goal['best']} "
        f"{_fmt(goal.get('speedup'), '.2f')}x -> {'met' if goal['met'] else 'not met'}"
    )
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> Path:
    """Images/s relative to the SavedModel per variant, one panel per batch size, with the
    min-max of the per-round ratios (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = report["settings"]["batches"]
    figure, axes = plt.subplots(1, len(batch_sizes), figsize=(6 * len(batch_sizes), 5))
    axes = np.atleast_1d(axes)
    for axis, batch in zip(axes, batch_sizes, strict=True):
        entries = [e for e in report["results"] if e["batch"] == batch]
        names = [e["variant"] for e in entries]
        ratios = [e["images_per_second_ratio"]["per_round"] for e in entries]
        medians = np.array([r["median"] or 0.0 for r in ratios])
        low = medians - np.array([r["min"] or 0.0 for r in ratios])
        high = np.array([r["max"] or 0.0 for r in ratios]) - medians
        rows = np.arange(len(names))
        axis.barh(rows, medians, xerr=[low, high], color="tab:blue", capsize=3)
        axis.axvline(1.0, color="0.4", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_yticks(rows, names, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel(f"images/s relative to {REFERENCE} (log; min-max of rounds)")
        axis.set_title(f"batch {batch}", fontsize=10)
        axis.margins(x=0.15)  # room for the value labels
        for row, value, top in zip(rows, medians, medians + high, strict=True):
            axis.annotate(f"{value:.2f}x", (max(value, top), row), xytext=(4, 0),
                          textcoords="offset points", va="center", fontsize=7)  # fmt: skip
    machine = report["machine"]
    figure.suptitle(
        f"convstack bench infer: {report['version_dir']}, {report['settings']['rounds']} rounds, "
        f"{machine['cpus']} CPUs, load average at start "
        f"{', '.join(f'{v:.1f}' for v in machine['load_average'] or [])}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def bench_main(argv: list[str]) -> int:
    """`convstack bench infer`: run, print the table, save JSON and PNG. 0 when it ran (goal met
    or not), 2 when the version or its data cannot be found."""
    args = build_parser().parse_args(argv)
    from convstack.trainer.cli import configure_logging

    configure_logging()
    try:
        report = run_benchmark(args)
    except BenchError as exc:
        print(f"convstack bench infer: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.out)
    write_json_atomic(out, report, sort_keys=False)
    plot = write_plot(report, out.with_suffix(".png"))
    print(summary_table(report))
    print(f"\nsaved {out} and {plot}")
    return 0
