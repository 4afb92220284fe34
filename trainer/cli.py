"""`convstack train`: flags or a YAML file -> TrainConfig -> a run -> one exported version.

Only light modules are imported at the top: `train_main` installs the SIGTERM handling before
anything heavier (the pydantic config models take 0.7 s to import on a loaded machine, and a
SIGTERM before the handling is death by signal, exit 143).
"""

from __future__ import annotations

import argparse
import sys

from convstack.trainer import crash_points, preemption
from convstack.trainer.errors import (
    ERROR_PREFIX,
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_PREEMPTED,
    TrainerError,
)

EPILOG = f"""\
exit status: {EXIT_OK} success; {EXIT_BAD_INPUT} bad input or configuration; {EXIT_PREEMPTED}
preempted (SIGTERM, in any phase): the run stopped at its next safe point (in training, after a
checkpoint; in export, after removing the staged version), rerun with the same --run-dir to
resume; 1 any other failure.

TF_CONFIG naming several workers selects MultiWorkerMirroredStrategy; the chief (or worker 0)
writes checkpoints and the export."""


START_UP_STOP = "nothing was written; rerun with the same --run-dir"


def build_parser() -> argparse.ArgumentParser:
    from convstack.common.configs import add_config_flags
    from convstack.trainer.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="convstack train",
        description="Train the Conv2D classifier with tf.distribute and export a versioned "
        "SavedModel to MODEL_BASE/MODEL_NAME/VERSION.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML file with the same keys as the flags "
        "(underscores: learning_rate); flags given on the command line win",
    )
    add_config_flags(parser, TrainConfig)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="debug lines, and TensorFlow's own log lines and warnings (as "
        "CONVSTACK_LOG_LEVEL=DEBUG does)",
    )
    return parser


def configure_logging(verbose: bool = False) -> None:
    """Our lines at INFO; TensorFlow's (its C++ start-up lines, tf.distribute's per-trace INFO,
    tf.data's sharding notes and warnings) only when verbose. See convstack.common.logs."""
    from convstack.common.logs import configure_logging as shared_logging_setup

    shared_logging_setup(verbose=verbose)


def train_main(argv: list[str]) -> int:
    """`convstack train ARGV`; returns the exit status (see EPILOG)."""
    # First of all, so that a SIGTERM in any phase, even while TensorFlow is imported, ends in
    # a clean stop and exit 75 rather than death by signal (143).
    with preemption.handling():
        crash_points.reached("started")
        try:
            # Nothing is written before TensorFlow is up: a SIGTERM meanwhile exits at once.
            with preemption.exit_at_once("start-up", START_UP_STOP):
                prepared = _prepare(argv)
        except TrainerError as exc:  # a SIGTERM that came before the block
            print(f"{ERROR_PREFIX} {exc}", file=sys.stderr)
            return exc.exit_code
        if isinstance(prepared, int):
            return prepared
        return _train(*prepared)


def _prepare(argv: list[str]):
    """The config from the flags and `train` (TensorFlow imported), or the exit status of
    flags that are wrong."""
    from convstack.common.configs import ConfigValueError, build_config
    from convstack.trainer.config import TrainConfig

    parser = build_parser()
    namespace = parser.parse_args(argv)
    try:
        config = build_config(TrainConfig, namespace, namespace.config)
    except ConfigValueError as exc:
        print(f"{ERROR_PREFIX} {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    configure_logging(namespace.verbose)
    from convstack.trainer.run import train  # imports TensorFlow: once config is valid

    return config, train


def _train(config, train) -> int:
    try:
        result = train(config)
    except TrainerError as exc:
        print(f"{ERROR_PREFIX} {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"test accuracy: {result.test_accuracy:.4f} (loss {result.test_loss:.4f})")
    print(
        f"training time: {result.training_seconds:.1f}s, {result.global_step} steps, "
        f"{result.strategy} with {result.num_replicas} replica(s)"
    )
    if result.export is not None and result.is_chief:
        print(f"exported version {result.export.version}: {result.export.path}")
    elif result.export is not None:
        print("took part in the export as a non-chief worker (its scratch copy was removed)")
    return EXIT_OK
