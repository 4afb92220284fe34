"""The trainer's error hierarchy and the process exit codes they map to.

Exit codes are part of the Kubernetes contract: the training Job's podFailurePolicy fails the
Job at once on EXIT_BAD_INPUT and treats EXIT_PREEMPTED as a retryable disruption.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
# EX_TEMPFAIL from sysexits.h: "try again later", which is what a preempted run should do.
EXIT_PREEMPTED = 75
# How `convstack train` starts the one line it ends with on an error.
ERROR_PREFIX = "convstack train: error:"


class TrainerError(Exception):
    """Base class; `exit_code` is what `convstack train` exits with."""

    exit_code = EXIT_FAILURE


class ConfigError(TrainerError):
    """The training configuration (flags or YAML) is invalid."""

    exit_code = EXIT_BAD_INPUT


class DataError(TrainerError):
    """A dataset is missing, unreadable or inconsistent. The message names the file."""

    exit_code = EXIT_BAD_INPUT


class ExportError(TrainerError):
    """Writing or verifying a SavedModel version failed; nothing numeric was left behind."""


class VersionExistsError(ExportError):
    """The requested model version already exists; versions are never overwritten."""

    exit_code = EXIT_BAD_INPUT


class Preempted(TrainerError):
    """SIGTERM arrived; a checkpoint was written and the run can be resumed."""

    exit_code = EXIT_PREEMPTED
