"""`convstack data`: dataset tools.

    convstack data to-tfrecord --data URI --out DIR [--shards N] [--seed S]
                               [--validation-fraction F] [--test-fraction F]

converts any dataset URI into TFRecord shards plus dataset.json (format in trainer.tfrecords),
split exactly as `convstack train` with the same seed and fractions would split it. Train on
the result with `--data 'tfrecord:DIR/*.tfrecord'`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from convstack.common.flags import fraction, positive_int
from convstack.trainer.config import TrainConfig
from convstack.trainer.errors import EXIT_BAD_INPUT, EXIT_OK, DataError


def _default(name: str):
    # The split flags default to what `convstack train` uses, so both split the same way.
    return TrainConfig.model_fields[name].default


def build_parser() -> argparse.ArgumentParser:
    """The `convstack data` argument parser."""
    parser = argparse.ArgumentParser(prog="convstack data", description="Dataset tools.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    convert = verbs.add_parser(
        "to-tfrecord",
        help="write a dataset as TFRecord shards plus dataset.json",
        description="Write every split of a dataset as PNG TFRecord shards plus dataset.json. "
        "Train on them with --data 'tfrecord:DIR/*.tfrecord'.",
    )
    convert.add_argument(
        "--data",
        required=True,
        metavar="URI",
        help="dataset URI: digits | npz:PATH | images:DIR | tfrecord:GLOB",
    )
    convert.add_argument("--out", required=True, metavar="DIR", help="new or empty directory")
    convert.add_argument(
        "--shards",
        type=positive_int,
        default=4,
        metavar="N",
        help="files per split; give at least as many as training workers (default: 4)",
    )
    convert.add_argument(
        "--seed",
        type=int,
        default=_default("seed"),
        metavar="S",
        help=f"seed of the split (default: {_default('seed')})",
    )
    for name in ("validation_fraction", "test_fraction"):
        convert.add_argument(
            "--" + name.replace("_", "-"),
            type=fraction,
            default=_default(name),
            metavar="F",
            help=f"{TrainConfig.model_fields[name].description} (default: {_default(name)})",
        )
    return parser


def data_main(argv: list[str]) -> int:
    """Run `convstack data ARGV...`; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on bad flags; the caller exits
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    if args.validation_fraction + args.test_fraction >= 1:
        print(
            "convstack data: error: --validation-fraction + --test-fraction must be below 1",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(_to_tfrecord(args))
    except DataError as exc:
        print(f"convstack data: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return EXIT_OK


def _to_tfrecord(args: argparse.Namespace) -> str:
    # Imported here: `convstack data --help` should not wait for TensorFlow.
    from convstack.trainer.data import SPLITS, load_dataset
    from convstack.trainer.tfrecords import DATASET_JSON, write_tfrecords

    dataset = load_dataset(
        args.data,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
    )
    written = write_tfrecords(dataset, args.out, shards=args.shards)
    info = dataset.info
    lines = [
        f"wrote {info.uri} ({info.num_classes} classes, images "
        f"{'x'.join(map(str, info.image_shape))}) to {args.out}:"
    ]
    for split in SPLITS:
        files = written[split]
        lines.append(
            f"  {split:<10}  {info.split_sizes[split]:>7} examples in {len(files)} files "
            f"({files[0].name} ...)"
        )
    lines.append(f"  {DATASET_JSON}")
    lines.append(f"train on it with --data 'tfrecord:{args.out}/*.tfrecord'")
    return "\n".join(lines)
