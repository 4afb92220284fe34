"""The rollout half of `make demo`: two embedded server replicas share one models.config file;
`convstack rollout` makes version 1 stable, rolls the better version 2 out through canary (with
the gates' figures) to stable, then tries a deliberately weak version 3, which the quality gate
refuses: its canary is rolled back and stable stays 2. `rollout status` ends it, and the servers
stop cleanly.

Run after the versions were exported: `python -m convstack.demo.rollout [--weak 3]`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from convstack.serving import model_config
from convstack.serving.process import ServerProcess

REPLICAS = 2
SERVER_FLAGS = ["--model_config_file_poll_wait_seconds=1", "--file_system_poll_wait_seconds=1"]
# The quality gate as it ships (--tolerance 0.01 against stable), plus a floor: a candidate
# below 90% is refused whatever stable's accuracy.
GATE_FLAGS = ["--accuracy-floor", "0.9"]
EXIT_REFUSED = 1  # `convstack rollout run` when a gate fails
QUALITY_FAILED = "gate quality  FAIL"


@dataclass(frozen=True)
class Story:
    """What the rollouts did: each command's exit status, and the labels at the end."""

    codes: dict[str, int]
    labels: dict[str, int]
    stopped: list[int]
    quality_refused: bool = False  # the weak version's run shows the quality gate failing

    def problems(self, good: int, weak: int | None) -> list[str]:
        """What did not go as the demo claims (empty when the story held)."""
        expected = {"run 1": 0, f"run {good}": 0, "status": 0}
        if weak is not None:
            expected[f"run {weak}"] = EXIT_REFUSED
        problems = [
            f"`rollout {step}` exited {self.codes.get(step)}, expected {code}"
            for step, code in expected.items()
            if self.codes.get(step) != code
        ]
        if weak is not None and not self.quality_refused:
            problems.append(f"the quality gate did not refuse version {weak}")
        if self.labels.get("stable") != good:
            problems.append(f"stable is {self.labels.get('stable')}, expected {good}")
        if any(self.stopped):
            problems.append(f"replicas stopped with exit statuses {self.stopped}")
        return problems


def write_initial_config(path: Path, model_name: str, model_dir: Path) -> None:
    """The config before any rollout: version 1 served, no labels yet."""
    config = model_config.add_model(
        model_config.ModelServerConfig(), model_name, model_dir.resolve(), specific=[1]
    )
    model_config.write_model_config(path, config)


def labels_of(path: Path, model_name: str) -> dict[str, int]:
    config = model_config.load_model_config(path)
    model = next(m for m in config.model_config_list.config if m.name == model_name)
    return dict(model.version_labels)


def rollout(verb: Sequence[str], common: Sequence[str], output: list[str] | None = None) -> int:
    """Run `convstack rollout VERB ...` as a user would, its output going to ours (and, line
    by line, to `output`)."""
    shown = ["convstack", "rollout", *verb, *common]
    print(f"\n$ {shlex.join(shown)}", flush=True)
    command = [sys.executable, "-m", "convstack.cli", "rollout", *verb, *common]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            if output is not None:
                output.append(line)
    return process.returncode


def tell(
    model_dir: Path,
    model_name: str,
    config_path: Path,
    gate_flags: Sequence[str],
    good: int = 2,
    weak: int | None = None,
) -> Story:
    """Version 1 stable, `good` rolled out to stable, then `weak` (if any) refused."""
    write_initial_config(config_path, model_name, model_dir)
    logs = tempfile.TemporaryDirectory()
    servers = [
        ServerProcess.start_with_config(config_path, Path(logs.name) / f"{i}.log", SERVER_FLAGS)
        for i in range(REPLICAS)
    ]
    targets = ",".join(server.grpc_target for server in servers)
    print(f"\n== {REPLICAS} server replicas ({targets}) polling {config_path}")
    common = ["--model", model_name, "--store", f"file:{config_path}", "--servers", targets]
    codes: dict[str, int] = {}
    quality_refused = False
    try:
        for server in servers:
            server.wait_available(model_name)
        codes["run 1"] = rollout(["run", "1", *gate_flags], common)
        observed = ["--observe-seconds", "3"]
        codes[f"run {good}"] = rollout(["run", str(good), *observed, *gate_flags], common)
        if weak is not None:
            print(f"\n== version {weak} is deliberately weak: the quality gate must refuse it")
            weak_output: list[str] = []
            codes[f"run {weak}"] = rollout(["run", str(weak), *gate_flags], common, weak_output)
            quality_refused = any(QUALITY_FAILED in line for line in weak_output)
            refused = codes[f"run {weak}"] == EXIT_REFUSED
            print(
                f"`rollout run {weak}` exited {codes[f'run {weak}']}"
                + (" (refused, as expected)" if refused else " (expected 1: refused)")
            )
        codes["status"] = rollout(["status"], common)
    finally:
        stopped = [server.stop(timeout=60) for server in servers]
        logs.cleanup()
    print(f"\nreplicas stopped with exit statuses {stopped}")
    return Story(codes, labels_of(config_path, model_name), stopped, quality_refused)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convstack.demo.rollout", description=__doc__)
    parser.add_argument("--model-base", default="build/demo/models")
    parser.add_argument("--model-name", default="digits")
    parser.add_argument("--config", default="build/demo/models.config")
    parser.add_argument("--weak", type=int, help="a version the quality gate must refuse")
    parser.add_argument("--golden", help="golden set URI (default: each version's test split)")
    parser.add_argument("--latency-slack-ms", help="the latency gate's slack (default: rollout's)")
    args = parser.parse_args(argv)
    gate_flags = [*GATE_FLAGS, *(["--golden", args.golden] if args.golden else [])]
    if args.latency_slack_ms:
        gate_flags += ["--latency-slack-ms", args.latency_slack_ms]
    model_dir = Path(args.model_base) / args.model_name
    story = tell(model_dir, args.model_name, Path(args.config).resolve(), gate_flags, 2, args.weak)
    for problem in story.problems(2, args.weak):
        print(f"demo: {problem}", file=sys.stderr)
    return 1 if story.problems(2, args.weak) else 0


if __name__ == "__main__":
    sys.exit(main())
