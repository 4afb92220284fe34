"""The golden set of a rollout's quality gate, read by the trainer's dataset code (imported only
when a gate needs it: it loads the rest of TensorFlow)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from convstack.serving.rollout.gates import GoldenSet
from convstack.serving.rollout.repository import VersionOnDisk

DEFAULT_SPLIT = {"seed": 42, "validation_fraction": 0.1, "test_fraction": 0.2}


@functools.lru_cache(maxsize=4)
def _test_split(uri: str, seed: int, validation_fraction: float, test_fraction: float):
    from convstack.trainer.data import (
        load_dataset,  # loads the rest of TensorFlow: only for the gates
    )

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
