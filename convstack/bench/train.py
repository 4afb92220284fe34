"""`convstack bench train`: our custom loop against Keras `model.fit` on the same data, model,
strategy and global batch, at each replica count and steps per call (1 and --steps-per-execution).

Every variant is built and warmed up once, then timed in `--rounds` interleaved rounds of
`--steps` steps (convstack/bench/rounds.py: machine load and own CPU per round, contended rounds
flagged), reported as median and min-max with ratios round by round. A benchmark, not a test:
it reports, never fails on a number."""

from __future__ import annotations

import argparse
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path

from convstack.bench import rounds
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
        "--steps", type=positive_int, default=100, help="timed steps per round (default 100)"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=5, help="rounds of every variant (default 5)"
    )
    parser.add_argument(
        "--reruns", type=int, default=0, help="measure a contended round again (default 0)"
    )
    parser.add_argument(
        "--contended-cores",
        type=float,
        default=rounds.DEFAULT_CONTENDED_CORES,
        help="other work above this many cores flags a round",
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


def _batches(dataset, config):
    from convstack.trainer import pipeline

    return pipeline.training_batches(
        dataset, global_batch_size=config.batch_size, seed=config.seed, epoch=0
    ).repeat()


def _custom_loop(strategy_setup, config, dataset) -> Callable[[int], float]:
    """The custom loop built and warmed up; the returned call times `steps` steps (seconds)."""
    from convstack.trainer.loop import DistributedTrainer

    trainer = DistributedTrainer(
        strategy_setup, config, dataset.info.image_shape, dataset.info.num_classes
    )
    iterator = iter(
        strategy_setup.strategy.experimental_distribute_dataset(_batches(dataset, config))
    )
    trainer.train_steps(iterator, config.steps_per_execution)  # compile and warm up
    trainer.train_totals()  # wait for it

    def timed(steps: int) -> float:
        started = time.perf_counter()
        done = 0
        while done < steps:
            chunk = min(config.steps_per_execution, steps - done)
            trainer.train_steps(iterator, chunk)
            done += chunk
        trainer.train_totals()  # the steps are asynchronous: wait for the last one
        return time.perf_counter() - started

    return timed


def _fit(strategy_setup, config, dataset) -> Callable[[int], float]:
    """model.fit on the same model, data and strategy, warmed up by one short epoch; the
    returned call runs one epoch of `steps` steps and returns its seconds (epoch callbacks, so
    fit's per-call setup of the data iterator is not counted)."""
    import keras

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
    batches = _batches(dataset, config)
    marks: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: marks.append(time.perf_counter()),
        on_epoch_end=lambda epoch, logs: marks.append(time.perf_counter()),
    )
    model.fit(
        batches, steps_per_epoch=2 * config.steps_per_execution, epochs=1, verbose=0, shuffle=False
    )

    def timed(steps: int) -> float:
        marks.clear()
        model.fit(
            batches, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False, callbacks=[timer]
        )
        return marks[1] - marks[0]

    return timed


LOOPS = {"custom": _custom_loop, "fit": _fit}


def variant_name(loop: str, replicas: int, steps_per_execution: int) -> str:
    return f"{loop}/r{replicas}/spe{steps_per_execution}"


def run_benchmark(args: argparse.Namespace) -> dict:
    from convstack.trainer.config import TrainConfig
    from convstack.trainer.data import load_dataset
    from convstack.trainer.strategy import StrategySetup, WorkerRole, configure_cpu_replicas

    replica_counts = sorted({int(r) for r in args.replicas.split(",")})
    configure_cpu_replicas(max(replica_counts))
    dataset = load_dataset(args.data)
    machine_before = rounds.machine_state()
    variants, setup_errors, described = {}, [], {}
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
            for loop, build in LOOPS.items():
                name = variant_name(loop, replicas, steps_per_execution)
                described[name] = {
                    "loop": loop,
                    "replicas": replicas,
                    "steps_per_execution": steps_per_execution,
                }
                try:
                    timed = build(setup, config, dataset)
                    timed(steps_per_execution)  # a first timed call, not counted
                except Exception as exc:  # a loop that cannot run this setting is a result
                    error = f"{type(exc).__name__}: {_root_cause(str(exc))}"
                    log.warning("%s failed: %s", name, error)
                    setup_errors.append({**described[name], "error": error})
                    continue
                variants[name] = _measurement(timed, args.steps, config.batch_size)
    records = rounds.run_rounds(
        variants,
        args.rounds,
        contended_cores=args.contended_cores,
        reruns=args.reruns,
        on_round=lambda r: log.info(
            "%s round %d: %.0f images/s%s",
            r["variant"],
            r["round"],
            r["figures"]["images_per_second"],
            " (contended)" if r["contended"] else "",
        ),
    )
    summary = {
        name: {**described[name], **rounds.summarize(records, name, ["images_per_second"])}
        for name in variants
    }
    return {
        "benchmark": "train",
        "data": args.data,
        "global_batch_size": args.batch_size,
        "timed_steps": args.steps,
        "rounds": args.rounds,
        "contended_cores": args.contended_cores,
        "machine": {"python": platform.python_version()}
        | {"before": machine_before, "after": rounds.machine_state()},
        "errors": setup_errors,
        "summary": summary,
        "ratios": _ratios(records, described, variants),
        "rounds_by_variant": records,
    }


def _measurement(timed: Callable[[int], float], steps: int, batch_size: int):
    def measure() -> dict:
        seconds = timed(steps)
        return {"seconds": seconds, "images_per_second": steps * batch_size / seconds}

    return measure


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _root_cause(message: str) -> str:
    """TensorFlow puts the useful line ("(0) INVALID_ARGUMENT: ...") deep in its message."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    causes = [line for line in lines if line.startswith("(0)")]
    return (causes or lines or ["(no message)"])[0][:300]


def _ratios(records: list[dict], described: dict, measured) -> dict:
    """custom/fit at each (replicas, steps per execution) where both ran, and the speed-up
    from the fewest to the most replicas for each loop: round by round and of the medians."""
    ratios = {}
    for name in measured:
        info = described[name]
        if info["loop"] != "custom":
            continue
        fit = variant_name("fit", info["replicas"], info["steps_per_execution"])
        if fit in measured:
            key = f"custom_over_fit_{info['replicas']}_replicas_spe{info['steps_per_execution']}"
            ratios[key] = rounds.paired_ratio(records, name, fit, "images_per_second")
    for loop in LOOPS:
        for spe in sorted({d["steps_per_execution"] for d in described.values()}):
            counts = sorted(
                d["replicas"]
                for n, d in described.items()
                if n in measured and d["loop"] == loop and d["steps_per_execution"] == spe
            )
            if len(counts) > 1:
                low, high = counts[0], counts[-1]
                ratios[f"{loop}_{high}_over_{low}_replicas_spe{spe}"] = rounds.paired_ratio(
                    records,
                    variant_name(loop, high, spe),
                    variant_name(loop, low, spe),
                    "images_per_second",
                )
    return ratios


def summary_text(report: dict) -> str:
    """One line per variant (median [min-max] images/s), the errors, then the ratios."""
    lines = [f"{'variant':<20}{'images/s median [min-max]':>30}{'contended':>11}"]
    for name, summary in report["summary"].items():
        figure = summary["images_per_second"]
        lines.append(
            f"{name:<20}{figure['median']:>14.0f} [{figure['min']:.0f}-{figure['max']:.0f}]"
            f"{summary['contended_rounds']:>8}/{summary['rounds']}"
        )
    for error in report["errors"]:
        lines.append(
            f"{variant_name(error['loop'], error['replicas'], error['steps_per_execution'])}: "
            f"{error['error']}"
        )
    for key, ratio in report["ratios"].items():
        rounds_range = ratio["per_round"]
        lines.append(
            f"{key}: {ratio['of_medians']:.2f}x (per round {rounds_range['min']:.2f}-"
            f"{rounds_range['max']:.2f})"
        )
    return "\n".join(lines)


def bench_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from convstack.trainer.cli import configure_logging

    configure_logging()
    report = run_benchmark(args)
    out = Path(args.out)
    write_json_atomic(out, report, sort_keys=False)
    print(summary_text(report))
    print(f"\nsaved {out}")
    return 0
