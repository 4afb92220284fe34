"""`convstack k8s train`, `convstack k8s deploy` and `convstack k8s rollout`: run the k8s/
overlays on a cluster.

train: render the overlay, take its training Job (single-node, or the Indexed multi-worker one
with its headless Service), give it a unique name, the image and the trainer's arguments,
create it, stream the chief's log and report how it ended: success, failure (exit code and
reason, e.g. OOMKilled), bad input (exit 2, failed at once by the podFailurePolicy) or
preemption.

deploy: server-side apply the overlay's serving stack and wait until the Deployment is
available. models.config in the serving ConfigMap belongs to the rollout commands once it
exists: deploy creates it when absent and otherwise never applies the overlay's copy over it.

rollout: create a uniquely named Job from the overlay's rollout template (k8s/base/rollout),
which runs `convstack rollout` next to the model claim as the ServiceAccount allowed to edit the
serving ConfigMap; stream its log and pass on the rollout command's exit status.

This module holds the command lines and turns errors into one line and an exit status. The
decisions (which objects, what names, what a Job's and pods' status mean) are pure functions of
dicts in k8s_training_plan, k8s_training_status, k8s_rollout_plan and k8s_deploy, tested
without a cluster; the I/O goes through serving.kube_api, from k8s_training, k8s_rollout and
k8s_deploy.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from collections.abc import Callable
from datetime import datetime, timezone

from convstack.common.kube_api import KubeApi, KubeError
from convstack.k8s import render
from convstack.k8s.deploy import deploy
from convstack.k8s.errors import (
    EXIT_API_ERROR,
    EXIT_INTERRUPTED,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
    ROLLOUT_EXIT_STATUS_HELP,
    LaunchError,
)
from convstack.k8s.job_status import JobOutcome
from convstack.k8s.objects import overlay_namespace, unique_job_name
from convstack.k8s.rollout import rollout
from convstack.k8s.rollout_plan import DEFAULT_NAME_PREFIX as ROLLOUT_NAME_PREFIX
from convstack.k8s.rollout_plan import plan_rollout
from convstack.k8s.training import train
from convstack.k8s.training_plan import default_name_prefix, plan_training
from convstack.k8s.waiting import DEFAULT_POLL_S, Follow

log = logging.getLogger(__name__)


def train_main(argv: list[str]) -> int:
    """`convstack k8s train`; exit statuses in EXIT_STATUS_HELP."""
    own, trainer_args = _split_passed_args(argv)
    args = build_train_parser().parse_args(own)

    def body() -> int:
        objects, namespace = _render(args)
        name = _job_name(args.name_prefix or default_name_prefix(objects))
        plan = plan_training(
            objects, name=name, image=args.image, trainer_args=trainer_args, namespace=namespace
        )
        follow = Follow(follow=not args.no_follow, timeout=args.timeout, poll=args.poll_interval)
        return _report(train(_connect(args), plan, follow))

    return _run("convstack k8s train", body)


def deploy_main(argv: list[str]) -> int:
    """`convstack k8s deploy`; exit statuses in EXIT_STATUS_HELP."""
    args = build_deploy_parser().parse_args(argv)

    def body() -> int:
        objects, namespace = _render(args)
        api = _connect(args)
        follow = Follow(timeout=args.timeout, poll=args.poll_interval)
        status, message = deploy(api, objects, namespace, follow)
        print(message)
        return status

    return _run("convstack k8s deploy", body)


def rollout_main(argv: list[str]) -> int:
    """`convstack k8s rollout`; exit statuses in ROLLOUT_EXIT_STATUS_HELP."""
    own, rollout_args = _split_passed_args(argv)
    args = build_rollout_parser().parse_args(own)

    def body() -> int:
        objects, namespace = _render(args)
        plan = plan_rollout(
            objects,
            name=_job_name(ROLLOUT_NAME_PREFIX),
            image=args.image,
            rollout_args=rollout_args,
            namespace=namespace,
        )
        follow = Follow(timeout=args.timeout, poll=args.poll_interval)
        return _report(rollout(_connect(args), plan, follow))

    return _run("convstack k8s rollout", body)


def _job_name(prefix: str) -> str:
    return unique_job_name(prefix, datetime.now(timezone.utc), secrets.token_hex(2))


def _report(outcome: JobOutcome) -> int:
    """A launched Job's outcome: a log line per failed pod, the verdict as the final line."""
    for line in outcome.details:
        log.info("%s", line)
    print(outcome.summary)
    return outcome.exit_status


def _render(args: argparse.Namespace) -> tuple[list[dict], str]:
    """The overlay's objects, and the namespace to use (--namespace, else the overlay's)."""
    objects = render.render(args.overlay)
    return objects, args.namespace or overlay_namespace(objects)


def _connect(args: argparse.Namespace) -> KubeApi:
    return KubeApi.from_config(args.kubeconfig, args.context)


def _run(prog: str, body: Callable[[], int]) -> int:
    """Run a command body: API and launch errors become one line on stderr."""
    from convstack.common.logs import configure_logging

    configure_logging()
    try:
        return body()
    except render.UnknownOverlayError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (KubeError, render.RenderError, LaunchError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_API_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; what was created goes on in the cluster", file=sys.stderr)
        return EXIT_INTERRUPTED


# -- command lines --------------------------------------------------------------------------


def build_train_parser() -> argparse.ArgumentParser:
    """The flags of `convstack k8s train` (the trainer's own flags follow `--`)."""
    parser = _parser(
        "convstack k8s train",
        "Create a uniquely named training Job from an overlay, stream the chief's "
        "log and report how it ended. Flags after `--` go to `convstack train` in the pod, "
        "replacing the manifest's flags of the same name. Each Job gets its own run directory "
        "(/runs/JOB_NAME) unless you pass --run-dir.",
        usage="convstack k8s train --overlay OVERLAY --image IMAGE [options] [-- TRAINER_FLAGS]",
    )
    parser.add_argument(
        "--image", required=True, help="the trainer image, e.g. registry/convstack-trainer:0.1.0"
    )
    parser.add_argument("--name-prefix", help="Job name prefix (default: the manifest's Job name)")
    parser.add_argument(
        "--no-follow", action="store_true", help="create the Job and return, without waiting"
    )
    return parser


def build_deploy_parser() -> argparse.ArgumentParser:
    """The flags of `convstack k8s deploy`."""
    return _parser(
        "convstack k8s deploy",
        "Server-side apply an overlay's serving stack (Namespace, claims, "
        "ConfigMap, Deployment, Services, PDB, HPA) and wait until the Deployment is available. "
        "An existing ConfigMap keeps its models.config (the rollout commands own it).",
    )


def build_rollout_parser() -> argparse.ArgumentParser:
    """The flags of `convstack k8s rollout` (the rollout command's own follow `--`)."""
    parser = _parser(
        "convstack k8s rollout",
        "Run `convstack rollout` in the cluster: create a uniquely named Job from the "
        "overlay's rollout template, which mounts the model claim and edits the serving "
        "ConfigMap as the ServiceAccount convstack-rollout; stream its log and exit with the "
        "rollout's status. What follows `--` is `convstack rollout`'s verb and flags (default: "
        "status); the template's --model, --store, --servers and --model-repository are kept "
        "unless given there.",
        usage="convstack k8s rollout --overlay OVERLAY [options] [-- VERB [ARGS] [FLAGS]]",
        epilog=ROLLOUT_EXIT_STATUS_HELP,
    )
    parser.add_argument("--image", help="the trainer image to run it with (default: the overlay's)")
    return parser


def _parser(
    prog: str, description: str, usage: str | None = None, epilog: str = EXIT_STATUS_HELP
) -> argparse.ArgumentParser:
    """A parser with the flags the commands share and the exit statuses as its epilog."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=usage,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--overlay", required=True, help="overlay of k8s/overlays (local, gpu, multiworker)"
    )
    parser.add_argument("--namespace", help="namespace to use (default: the overlay's)")
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="stop waiting after S seconds (the work goes on in the cluster)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_POLL_S,
        metavar="S",
        help=f"seconds between status checks (default {DEFAULT_POLL_S:g})",
    )
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default $KUBECONFIG, ~/.kube/config, or the pod's service account)",
    )
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    return parser


def _split_passed_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []
