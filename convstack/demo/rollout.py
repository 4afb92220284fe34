"""The rollout half of `make demo`: two embedded server replicas share one models.config file;
`convstack rollout` makes version 1 stable, rolls version 2 out through canary (with the gates'
figures) to stable, and shows `rollout status`. The servers stop cleanly at the end.

Run after two versions were exported: `python -m convstack.demo.rollout`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from convstack.serving import model_config
from convstack.serving.process import ServerProcess

REPLICAS = 2
SERVER_FLAGS = ["--model_config_file_poll_wait_seconds=1", "--file_system_poll_wait_seconds=1"]
# One test image is 0.28% of the 359 in the digits test split, and two trainings that differ
# only in epochs land a few images apart: a 2-point tolerance tells noise from a regression.
GATE_FLAGS = ["--accuracy-floor", "0.9", "--tolerance", "0.02"]


def write_initial_config(path: Path, model_name: str, model_dir: Path) -> None:
    """The config before any rollout: version 1 served, no labels yet."""
    config = model_config.add_model(
        model_config.ModelServerConfig(), model_name, model_dir.resolve(), specific=[1]
    )
    model_config.write_model_config(path, config)


def rollout(verb: Sequence[str], common: Sequence[str]) -> int:
    """Run `convstack rollout VERB ...` as a user would, its output going to ours."""
    shown = ["convstack", "rollout", *verb, *common]
    print(f"\n$ {shlex.join(shown)}", flush=True)
    command = [sys.executable, "-m", "convstack.cli", "rollout", *verb, *common]
    return subprocess.run(command, check=False, timeout=900).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convstack.demo.rollout", description=__doc__)
    parser.add_argument("--model-base", default="build/demo/models")
    parser.add_argument("--model-name", default="digits")
    parser.add_argument("--config", default="build/demo/models.config")
    parser.add_argument("--golden", help="golden set URI (default: each version's test split)")
    parser.add_argument("--latency-slack-ms", help="the latency gate's slack (default: rollout's)")
    args = parser.parse_args(argv)
    model_dir = Path(args.model_base) / args.model_name
    config_path = Path(args.config).resolve()
    write_initial_config(config_path, args.model_name, model_dir)
    logs = tempfile.TemporaryDirectory()
    servers = [
        ServerProcess.start_with_config(config_path, Path(logs.name) / f"{i}.log", SERVER_FLAGS)
        for i in range(REPLICAS)
    ]
    targets = ",".join(server.grpc_target for server in servers)
    print(f"\n== {REPLICAS} server replicas ({targets}) polling {config_path}")
    common = ["--model", args.model_name, "--store", f"file:{config_path}", "--servers", targets]
    gate_flags = [*GATE_FLAGS, *(["--golden", args.golden] if args.golden else [])]
    if args.latency_slack_ms:
        gate_flags += ["--latency-slack-ms", args.latency_slack_ms]
    try:
        for server in servers:
            server.wait_available(args.model_name)
        codes = [
            rollout(["run", "1", *gate_flags], common),
            rollout(["run", "2", "--observe-seconds", "3", *gate_flags], common),
            rollout(["status"], common),
        ]
    finally:
        stopped = [server.stop(timeout=60) for server in servers]
        logs.cleanup()
    print(f"\nreplicas stopped with exit statuses {stopped}")
    return 0 if not any(codes) and not any(stopped) else 1


if __name__ == "__main__":
    sys.exit(main())
