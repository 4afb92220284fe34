"""`convstack rollout VERB --model NAME --store STORE [--servers T,...]`.

Verbs: status, canary VERSION, promote, rollback [--to VERSION], run VERSION, retire --keep N
[--yes]. Exit status: 0 done (or nothing left to do: `run VERSION` again once VERSION is
stable), 1 a gate failed or the rollout stopped (a server unreachable, a config that does not
parse...; the model is left as the output says), 2 bad input (unknown store, version or model;
a verb that does not apply).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from convstack.client.cli import quiet_stderr
from convstack.common.flags import positive_number
from convstack.common.logs import configure_logging

with quiet_stderr():  # the TF Serving protos import TensorFlow, which talks on stderr
    from convstack.serving.rollout import golden
    from convstack.serving.rollout.controller import (
        ConcurrentChangeError,
        Rollout,
        RolloutError,
        RolloutSettings,
    )
    from convstack.serving.rollout.gates import GateSettings
    from convstack.serving.rollout.history import HistoryError
    from convstack.serving.rollout.plan import RolloutPlanError
    from convstack.serving.rollout.report import format_status, gather_status
    from convstack.serving.rollout.repository import RepositoryError
    from convstack.serving.rollout.store import ConfigStoreError, open_store
    from convstack.serving.rollout.watch import WatchError

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# golden URI (or None: the test split of the candidate's dataset) -> loader for a version
GoldenFactory = Callable[[str | None], Callable]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convstack rollout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    status = _verb(verbs, "status", "versions on disk, per server, and labels")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for name, help_text in (
        ("canary", "gates, then load VERSION next to stable as canary"),
        ("run", "canary, observe, then promote (or roll back on a gate)"),
    ):
        verb = _verb(verbs, name, help_text)
        verb.add_argument("version", type=int, help="the version to roll out")
        _gate_flags(verb)
    _verb(verbs, "promote", "stable -> canary; the old stable stays loaded as previous")
    rollback = _verb(verbs, "rollback", "drop the canary, or stable -> previous")
    rollback.add_argument("--to", type=int, help="make this version stable instead")
    retire = _verb(verbs, "retire", "delete versions neither labelled nor among the newest")
    retire.add_argument("--keep", type=int, required=True, help="keep the N newest versions")
    retire.add_argument("--yes", action="store_true", help="delete (default: a dry run)")
    return parser


def _verb(verbs, name: str, help_text: str) -> argparse.ArgumentParser:
    verb = verbs.add_parser(name, help=help_text, description=help_text)
    verb.add_argument("--model", required=True, help="the model's name in models.config")
    verb.add_argument(
        "--store", required=True, help="file:PATH | configmap:NAMESPACE/NAME[:KEY] | grpc:HOST:PORT"
    )
    verb.add_argument(
        "--servers",
        action="append",
        default=[],
        help="gRPC targets to watch, comma-separated or repeated; "
        "dns:///NAME:PORT expands to every address",
    )
    verb.add_argument(
        "--model-repository", help="local path of the model's versions (default: its base_path)"
    )
    verb.add_argument("--grpc-mirror", help="grpc: store: the local copy of the pushed config")
    verb.add_argument(
        "--wait-timeout",
        type=positive_number,
        default=300.0,
        help="seconds every server gets to reach each step (default 300)",
    )
    verb.add_argument(
        "--log-level",
        help="level of the rollout's log lines (default: CONVSTACK_LOG_LEVEL, else WARNING)",
    )
    verb.add_argument(
        "--verbose",
        action="store_true",
        help="debug lines, and TensorFlow's own log lines and warnings (as "
        "CONVSTACK_LOG_LEVEL=DEBUG does)",
    )
    return verb


# Gate thresholds: flag -> (GateSettings field, help). Defaults come from GateSettings.
_GATE_THRESHOLDS = {
    "--tolerance": ("tolerance", "accuracy the candidate may lose vs stable"),
    "--accuracy-floor": ("accuracy_floor", "minimum accuracy whatever stable's"),
    "--latency-factor": ("latency_factor", "candidate p99 <= factor x stable p99 + slack"),
    "--latency-slack-ms": ("latency_slack_ms", "the slack of the latency gate, in ms"),
    "--infra-timeout": ("infra_timeout", "seconds the sandbox load and golden batch may take"),
}


def _gate_flags(verb: argparse.ArgumentParser) -> None:
    defaults = GateSettings()
    verb.add_argument(
        "--golden",
        help="golden set: a dataset URI as `convstack train --data` "
        "takes it (default: the test split of the candidate's dataset)",
    )
    for flag, (field_name, help_text) in _GATE_THRESHOLDS.items():
        default = getattr(defaults, field_name)
        verb.add_argument(flag, type=float, default=default, help=f"{help_text} ({default:g})")
    verb.add_argument(
        "--tolerance-kind", choices=["absolute", "relative"], default=defaults.tolerance_kind
    )
    verb.add_argument(
        "--observe-seconds",
        type=float,
        default=0.0,
        help="run: seconds of repeated golden traffic before promoting",
    )
    verb.add_argument(
        "--sandbox-backend",
        choices=["auto", "embedded", "tfserving"],
        default="auto",
        help="server of the infra gate (auto: TF Serving if installed)",
    )


def parse_servers(values: Sequence[str]) -> list[str]:
    return [s.strip() for value in values for s in value.split(",") if s.strip()]


def _settings(args: argparse.Namespace) -> RolloutSettings:
    gates = GateSettings()
    if hasattr(args, "tolerance"):
        thresholds = {field: getattr(args, field) for field, _ in _GATE_THRESHOLDS.values()}
        gates = GateSettings(tolerance_kind=args.tolerance_kind, **thresholds)
    return RolloutSettings(
        wait_timeout=args.wait_timeout,
        observe_seconds=getattr(args, "observe_seconds", 0.0),
        sandbox_backend=getattr(args, "sandbox_backend", "auto"),
        gates=gates,
    )


def make_rollout(args: argparse.Namespace, golden_factory: GoldenFactory) -> Rollout:
    store = open_store(args.store, grpc_mirror=args.grpc_mirror)
    servers = parse_servers(args.servers)
    if not servers and args.store.startswith("grpc:"):
        servers = [args.store.removeprefix("grpc:")]
    return Rollout(
        args.model,
        store,
        servers,
        golden_factory(getattr(args, "golden", None)),
        repository=args.model_repository,
        settings=_settings(args),
        say=print,
    )


def run_verb(rollout: Rollout, args: argparse.Namespace) -> int:
    if args.verb == "status":
        status = gather_status(rollout)
        print(json.dumps(status, indent=2) if args.json else format_status(status))
        return EXIT_OK
    if args.verb == "retire":
        return _retire(rollout, args.keep, args.yes)
    if args.verb == "canary":
        outcome = rollout.canary(args.version)
    elif args.verb == "run":
        outcome = rollout.run(args.version)
    elif args.verb == "promote":
        outcome = rollout.promote()
    else:
        outcome = rollout.rollback(args.to)
    if outcome.detail:
        print(f"rollout {args.verb}: {outcome.detail}")
    labels = ", ".join(f"{k}={v}" for k, v in sorted(outcome.after.labels.items()))
    print(f"{args.model}: {labels or 'no labels'}; loaded {sorted(outcome.after.versions)}")
    return EXIT_OK if outcome.ok else EXIT_FAILED


def _retire(rollout: Rollout, keep: int, delete: bool) -> int:
    retiring = rollout.retire(keep, delete)
    if not retiring:
        print("nothing to retire")
    for version in retiring:
        print(
            f"{'deleted' if delete else 'would delete'} version {version.version} ({version.path})"
        )
    if retiring and not delete:
        print("dry run: pass --yes to delete")
    return EXIT_OK


def rollout_main(argv: Sequence[str], golden_factory: GoldenFactory = golden.golden_loader) -> int:
    args = build_parser().parse_args(list(argv))
    configure_logging(args.verbose, args.log_level, default="WARNING", fmt=LOG_FORMAT)
    try:
        rollout = make_rollout(args, golden_factory)
        return run_verb(rollout, args)
    except (RolloutPlanError, RepositoryError, ValueError) as error:
        print(f"convstack rollout {args.verb}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (
        ConcurrentChangeError,
        RolloutError,
        ConfigStoreError,
        WatchError,
        HistoryError,
    ) as error:
        print(f"convstack rollout {args.verb}: {error}", file=sys.stderr)
        return EXIT_FAILED
