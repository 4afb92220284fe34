"""`convstack bench train`: our custom loop against Keras `model.fit` on the same data, model,
strategy and global batch, and 1 vs 2 replicas. A benchmark, not a test: it reports, never fails
on a number."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

from convstack.common.files import write_json_atomic
from convstack.common.flags import positive_int

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convstack bench train",
        description="Images/s of the custom distributed loop vs model.fit, at 1 and 2 replicas.",
    )
    parser.add_argument("--data", default="digits", help="dataset URI (default: digits)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="global batch size")
    parser.add_argument(
        "--steps", type=positive_int, default=120, help="timed steps per measurement"
    )
    parser.add_argument(
        "--steps-per-execution",
        type=positive_int,
        default=10,
        help="steps per compiled call, measured besides 1 for both loops",
    )
    parser.add_argument("--replicas", default="1,2", help="replica counts to measure")
    parser.add_argument("--out", default="bench-results/train.json", help="JSON output path")
    return parser


def _strategy(replicas: int):
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(devices=[f"/cpu:{i}" for i in range(replicas)])


def _custom_loop_images_per_second(strategy_setup, config, dataset, steps: int) -> float:
    from convstack.trainer import pipeline
    from convstack.trainer.loop import DistributedTrainer

    trainer = DistributedTrainer(
        strategy_setup, config, dataset.info.image_shape, dataset.info.num_classes
    )
    batches = pipeline.training_batches(
        dataset, global_batch_size=config.batch_size, seed=config.seed, epoch=0
    ).repeat()
    iterator = iter(strategy_setup.strategy.experimental_distribute_dataset(batches))
    trainer.train_steps(iterator, config.steps_per_execution)  # compile and warm up
    started = time.perf_counter()
    done = 0
    while done < steps:
        chunk = min(config.steps_per_execution, steps - done)
        trainer.train_steps(iterator, chunk)
        done += chunk
    return steps * config.batch_size / (time.perf_counter() - started)


def _fit_images_per_second(strategy_setup, config, dataset, steps: int) -> float:
    import keras

    from convstack.trainer import pipeline
    from convstack.trainer.model import build_model

    with strategy_setup.strategy.scope():
        model = build_model(config.model_part(), dataset.info.image_shape, dataset.info.num_classes)
        model.compile(
            optimizer=keras.optimizers.Adam(config.learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            steps_per_execution=config.steps_per_execution,
        )
        # Same Keras 3 pitfall as the custom loop: unbuilt optimizer slots inside the
        # distributed step fail with "You must feed a value for placeholder tensor".
        model.optimizer.build(model.trainable_variables)
    batches = pipeline.training_batches(
        dataset, global_batch_size=config.batch_size, seed=config.seed, epoch=0
    ).repeat()
    epoch_seconds: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epoch_seconds.append(time.perf_counter()),
        on_epoch_end=lambda epoch, logs: epoch_seconds.append(time.perf_counter()),
    )
    # Epoch 1 compiles and warms up; epoch 2 is timed.
    model.fit(batches, steps_per_epoch=steps, epochs=2, verbose=0, callbacks=[timer])
    return steps * config.batch_size / (epoch_seconds[3] - epoch_seconds[2])


def run_benchmark(args: argparse.Namespace) -> dict:
    from convstack.trainer.config import TrainConfig
    from convstack.trainer.data import load_dataset
    from convstack.trainer.strategy import StrategySetup, WorkerRole, configure_cpu_replicas

    replica_counts = sorted({int(r) for r in args.replicas.split(",")})
    configure_cpu_replicas(max(replica_counts))
    dataset = load_dataset(args.data)
    results = []
    for steps_per_execution in sorted({1, args.steps_per_execution}):
        config = TrainConfig(
            data=args.data, batch_size=args.batch_size, steps_per_execution=steps_per_execution
        )
        for replicas in replica_counts:
            strategy = _strategy(replicas)
            devices = tuple(strategy.extended.worker_devices)
            setup = StrategySetup(
                strategy, "MirroredStrategy", replicas, WorkerRole(), devices, False
            )
            for loop, measure in LOOPS.items():
                results.append(_measure(loop, measure, setup, config, dataset, args.steps))
    return {
        "benchmark": "train",
        "data": args.data,
        "global_batch_size": args.batch_size,
        "timed_steps": args.steps,
        "machine": {"cpus": _cpu_count(), "python": platform.python_version()},
        "results": results,
        "ratios": _ratios(results),
    }


LOOPS = {"custom": _custom_loop_images_per_second, "fit": _fit_images_per_second}


def _measure(loop, measure, setup, config, dataset, steps) -> dict:
    entry = {
        "loop": loop,
        "replicas": setup.num_replicas,
        "steps_per_execution": config.steps_per_execution,
    }
    try:
        entry["images_per_second"] = round(measure(setup, config, dataset, steps), 1)
        log.info("%s: %.0f images/s", entry, entry["images_per_second"])
    except Exception as exc:  # a loop that cannot run this setting is a result, not a crash
        entry["error"] = f"{type(exc).__name__}: {_root_cause(str(exc))}"
        log.warning("%s failed: %s", entry, entry["error"])
    return entry


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _root_cause(message: str) -> str:
    """TensorFlow puts the useful line ("(0) INVALID_ARGUMENT: ...") deep in its message."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    causes = [line for line in lines if line.startswith("(0)")]
    return (causes or lines or ["(no message)"])[0][:300]


def _ratios(results: list[dict]) -> dict:
    """custom/fit at each (replicas, steps per execution) where both ran, and the speed-up
    from the fewest to the most replicas for each loop."""
    speed = {
        (r["loop"], r["replicas"], r["steps_per_execution"]): r["images_per_second"]
        for r in results
        if "images_per_second" in r
    }
    ratios = {}
    for (loop, replicas, spe), value in sorted(speed.items()):
        if loop == "custom" and ("fit", replicas, spe) in speed:
            key = f"custom_over_fit_{replicas}_replicas_spe{spe}"
            ratios[key] = round(value / speed["fit", replicas, spe], 3)
    for loop, _, spe in sorted({(k[0], 0, k[2]) for k in speed}):
        counts = sorted(r for (lp, r, s) in speed if lp == loop and s == spe)
        if len(counts) > 1:
            low, high = counts[0], counts[-1]
            ratios[f"{loop}_{high}_over_{low}_replicas_spe{spe}"] = round(
                speed[loop, high, spe] / speed[loop, low, spe], 3
            )
    return ratios


def bench_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from convstack.trainer.cli import configure_logging

    configure_logging()
    report = run_benchmark(args)
    out = Path(args.out)
    write_json_atomic(out, report, sort_keys=False)
    json.dump(report, sys.stdout, indent=2)
    print(f"\nsaved {out}")
    return 0
