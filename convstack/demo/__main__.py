"""`make demo`: the whole story on the bundled digits, with 2 replicas on this CPU.

1. Train version 1, the baseline (the default model), and export it.
2. Serve it with the embedded server; predict through gRPC, `convstack predict` and REST.
3. Train version 2 with one genuine change (V2_CHANGE) that is better on the test split.
4. Train version 3, deliberately weak (WEAK_EPOCHS epoch).
5. Roll out on two server replicas: 1 stable, 2 through canary to stable with the default
   quality tolerance, 3 refused by the quality gate (its canary rolled back, stable untouched).
6. Say where the learning curves and the TensorBoard logs are.

Every training uses the same seed, so the figures repeat run after run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from convstack.common.logs import configure_logging

MODEL = "digits"
EPOCHS = 25
# Version 2's one change: training images shifted at random by up to 1/8 of their size (3.5 of
# 28 pixels), which takes more epochs to fit. Measured on this CPU, test images right of 359
# at 30 epochs: seed 42 (the demo's) 356 against version 1's 354, seed 1 357 against 351, seed
# 2 358 against 354; version 1's settings trained for 30 (or 40) epochs get 351, so the shift,
# not the epochs, makes the difference.
V2_CHANGE = ["--random-shift", "0.125"]
V2_EPOCHS = 30
V2_WHY = "random shifts of the training images (--random-shift 0.125: up to 3.5 of 28 pixels)"
WEAK_EPOCHS = 1
CARD = Path("assets.extra") / "model_card.json"


class DemoError(Exception):
    """A step failed; the message says which."""


def train(directory: Path, run: str, epochs: int, extra: list[str]) -> float:
    """`convstack train` as a user would run it; the exported version's test accuracy."""
    flags = ["--data", "digits", "--replicas", "2", "--epochs", str(epochs), *extra]
    flags += ["--model-base", str(directory / "models"), "--model-name", MODEL]
    flags += ["--run-dir", str(directory / "runs" / run)]
    print(f"\n$ {shlex.join(['convstack', 'train', *flags])}", flush=True)
    command = [sys.executable, "-m", "convstack.cli", "train", *flags]
    code = subprocess.run(command, check=False, timeout=900).returncode
    if code != 0:
        raise DemoError(f"convstack train exited {code} for {run}")
    record = json.loads((directory / "runs" / run / "export.json").read_text())
    card = json.loads((Path(record["path"]) / CARD).read_text())
    return float(card["test_metrics"]["accuracy"])


def correct_of(accuracy: float, test_images: int) -> str:
    return f"{round(accuracy * test_images)}/{test_images}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convstack.demo", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("build/demo"), help="where it all goes")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="of version 1")
    parser.add_argument("--v2-epochs", type=int, default=V2_EPOCHS, help="of version 2")
    parser.add_argument("--latency-slack-ms", help="the latency gate's slack (default: rollout's)")
    args = parser.parse_args(argv)
    directory = args.dir.resolve()
    if (directory / "models").exists():
        print(f"demo: {directory} holds an earlier demo; remove it first", file=sys.stderr)
        return 2
    configure_logging()
    try:
        return tell(directory, args.epochs, args.v2_epochs, args.latency_slack_ms)
    except DemoError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1


def tell(directory: Path, epochs: int, v2_epochs: int, latency_slack_ms: str | None) -> int:
    from convstack.demo import rollout, serve
    from convstack.trainer.data import load_dataset

    test_images = load_dataset("digits").info.split_sizes["test"]
    print(f"\n== version 1: the baseline, the default model, {epochs} epochs")
    v1 = train(directory, "digits", epochs, [])
    if serve.main(["--model-base", str(directory / "models"), "--model-name", MODEL]) != 0:
        raise DemoError("serving version 1 failed")
    print(f"\n== version 2: {V2_WHY}, {v2_epochs} epochs")
    v2 = train(directory, "digits-v2", v2_epochs, V2_CHANGE)
    print(f"\n== version 3: deliberately weak, {WEAK_EPOCHS} epoch")
    v3 = train(directory, "digits-v3-weak", WEAK_EPOCHS, [])

    gate_flags = list(rollout.GATE_FLAGS)
    if latency_slack_ms:
        gate_flags += ["--latency-slack-ms", latency_slack_ms]
    story = rollout.tell(
        directory / "models" / MODEL, MODEL, directory / "models.config", gate_flags, 2, 3
    )
    problems = story.problems(2, 3)
    if v2 <= v1:
        problems.append(f"version 2 ({v2:.4f}) is not better than version 1 ({v1:.4f})")

    print("\n== the story")
    rows = [
        (1, f"baseline, {epochs} epochs", v1),
        (2, f"{shlex.join(V2_CHANGE)}, {v2_epochs} epochs", v2),
        (3, f"deliberately weak, {WEAK_EPOCHS} epoch", v3),
    ]
    for version, what, accuracy in rows:
        print(
            f"version {version}  {what:<32} test accuracy {accuracy:.4f} "
            f"({correct_of(accuracy, test_images)} test images)"
        )
    print(
        f"stable: version {story.labels.get('stable')}; `rollout run 3` exited "
        f"{story.codes.get('run 3')}: the quality gate refused it and its canary was rolled back"
    )
    runs = directory / "runs"
    print(f"learning curves, versions 1 and 2: {runs / 'digits-v2' / 'learning_curves.png'}")
    print(f"learning curves, all three:        {runs / 'digits-v3-weak' / 'learning_curves.png'}")
    tensorboard = Path(sys.executable).parent / "tensorboard"
    print(f"TensorBoard logs of every run:     {tensorboard} --logdir {runs}")
    for problem in problems:
        print(f"demo: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
