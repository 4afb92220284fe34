"""`convstack rollout ...`: the rollout commands of serving/ with the golden set loaded by the
trainer's dataset code (serving never imports the trainer; this app-level module joins them)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from client.cli import quiet_stderr

with quiet_stderr():  # the TF Serving protos import TensorFlow, which talks on stderr
    from serving.model_repository import VersionOnDisk
    from serving.rollout_cli import rollout_main as serving_rollout_main
    from serving.rollout_gates import GoldenSet

DEFAULT_SPLIT = {"seed": 42, "validation_fraction": 0.1, "test_fraction": 0.2}


@functools.lru_cache(maxsize=4)
def _test_split(uri: str, seed: int, validation_fraction: float, test_fraction: float):
    from trainer.data import load_dataset  # loads the rest of TensorFlow: only for the gates

    dataset = load_dataset(
        uri, seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction
    )
    images, labels = dataset.arrays("test")
    return images, labels, dataset.info.fingerprint


def _split_of(card: dict[str, Any]) -> dict[str, Any]:
    config = (card.get("training") or {}).get("config") or {}
    return {key: config.get(key, default) for key, default in DEFAULT_SPLIT.items()}


def golden_loader(golden_uri: str | None) -> Callable[[VersionOnDisk], GoldenSet]:
    """A loader of the golden set for a candidate: `golden_uri`'s test split, or the test split
    of the dataset in the candidate's model card (checked against the card's fingerprint)."""

    def load(candidate: VersionOnDisk) -> GoldenSet:
        split = _split_of(candidate.card)
        if golden_uri is not None:
            images, labels, _ = _test_split(golden_uri, **split)
            return GoldenSet(images, labels, f"{golden_uri} (test split)")
        dataset = candidate.card.get("dataset") or {}
        uri = dataset.get("uri")
        if not uri:
            raise ValueError(
                f"{candidate.path}: the model card names no dataset; pass --golden DATA"
            )
        images, labels, fingerprint = _test_split(uri, **split)
        if dataset.get("fingerprint") and fingerprint != dataset["fingerprint"]:
            raise ValueError(
                f"{uri}: its data differ from what version {candidate.version} was trained on "
                "(fingerprint mismatch); pass --golden DATA"
            )
        return GoldenSet(images, labels, f"{uri} (test split of version {candidate.version})")

    return load


def rollout_main(argv: Sequence[str]) -> int:
    return serving_rollout_main(argv, golden_loader)
