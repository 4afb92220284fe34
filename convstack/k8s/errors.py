"""How the `convstack k8s` commands fail: LaunchError and the exit statuses they share (listed
in the --help of train and deploy by EXIT_STATUS_HELP, of rollout by ROLLOUT_EXIT_STATUS_HELP)."""

from __future__ import annotations

# The trainer's exit codes are the contract the Jobs' podFailurePolicy acts on.
from convstack.trainer.errors import EXIT_BAD_INPUT as TRAINER_BAD_INPUT
from convstack.trainer.errors import EXIT_PREEMPTED as TRAINER_PREEMPTED

__all__ = [
    "EXIT_API_ERROR",
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_OOM_KILLED",
    "EXIT_PREEMPTED",
    "EXIT_STATUS_HELP",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "ROLLOUT_BAD_INPUT",
    "ROLLOUT_EXIT_STATUS_HELP",
    "ROLLOUT_STOPPED",
    "TRAINER_BAD_INPUT",
    "TRAINER_PREEMPTED",
    "LaunchError",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_OOM_KILLED = 4
EXIT_PREEMPTED = 5
EXIT_TIMEOUT = 6
EXIT_API_ERROR = 7
EXIT_INTERRUPTED = 130

# `convstack rollout`'s exit codes (serving/rollout/cli.py), which `k8s rollout` passes on:
# 0 done, 1 a gate failed or the rollout stopped, 2 bad input.
ROLLOUT_STOPPED = 1
ROLLOUT_BAD_INPUT = 2

EXIT_STATUS_HELP = f"""\
exit status:
  {EXIT_OK}  success (train: the Job completed, or was created with --no-follow;
     deploy: the Deployment is available)
  {EXIT_FAILED}  the Job failed (the trainer's exit code and reason are reported), or the
     Deployment exceeded its progress deadline
  {EXIT_USAGE}  bad usage (unknown overlay, bad flags)
  {EXIT_BAD_INPUT}  bad input: the trainer exited {TRAINER_BAD_INPUT}, and the podFailurePolicy
     failed the Job at once
  {EXIT_OOM_KILLED}  the trainer was OOMKilled (raise the memory limit or lower --batch-size)
  {EXIT_PREEMPTED}  the Job ended while its pod was preempted/evicted (DisruptionTarget or exit
     {TRAINER_PREEMPTED}); rerun with the same --run-dir to resume from the checkpoint
  {EXIT_TIMEOUT}  --timeout passed; the Job or rollout goes on in the cluster
  {EXIT_API_ERROR}  a Kubernetes API or rendering error (no cluster, forbidden, conflict, ...)
"""

ROLLOUT_EXIT_STATUS_HELP = f"""\
exit status (0, 1 and 2 are the rollout command's own):
  {EXIT_OK}  the rollout command succeeded in the Job
  {EXIT_FAILED}  the rollout stopped: a gate failed or a version did not load (it rolled back
     or left stable untouched; the gates' figures are in the log), or the Job failed otherwise
  {EXIT_USAGE}  bad input: the rollout command refused its arguments or inputs (it exited
     {ROLLOUT_BAD_INPUT}), or bad usage of this command (unknown overlay, bad flags)
  {EXIT_OOM_KILLED}  the rollout container was OOMKilled (raise the Job's memory limit)
  {EXIT_PREEMPTED}  the rollout pod was preempted/evicted midway: check `-- status`
  {EXIT_TIMEOUT}  --timeout passed; the rollout goes on in the cluster
  {EXIT_API_ERROR}  a Kubernetes API or rendering error (no cluster, forbidden, conflict, ...)
"""


class LaunchError(RuntimeError):
    """The overlay cannot be launched as asked; the message is one line."""
