"""Logging set-up shared by the long-running verbs (train, serve, rollout): our own lines at
INFO (or CONVSTACK_LOG_LEVEL), TensorFlow's chatter off unless asked for with `--verbose` or
CONVSTACK_LOG_LEVEL=DEBUG.

TensorFlow talks on three channels, each quieted at its source:
- C++ (absl) log lines on file descriptor 2, below TF_CPP_MIN_LOG_LEVEL (2: errors only).
  TensorFlow 2.21 ignores that level for what it writes before absl is initialised, during
  `import tensorflow` and the first device search (oneDNN and CUDA notices, each twice), so
  those two are run with descriptor 2 captured and replayed filtered to the same level.
- The Python loggers `tensorflow` and `absl` (tf.distribute's per-trace "Reduce to ..." and
  "Collective all_reduce ..." INFO lines, tf.data's sharding notes): WARNING.
- Python warnings: only the ones listed in QUIET_WARNINGS, by message and module; any other
  warning still shows.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import io
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator

LEVEL_ENV = "CONVSTACK_LOG_LEVEL"
TF_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
QUIET_TF_LEVEL = "2"  # absl's errors and fatals still show
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Warnings TensorFlow gives on every run that tell a user nothing: (message regex, module regex).
QUIET_WARNINGS = (
    # tf.distribute reads a dataset's options inside a traced function, every run.
    (
        r"To make it possible to preserve tf\.data options across serialization boundaries",
        r"tensorflow\.python\.data\.ops\.dataset_ops",
    ),
)

# One absl/glog record: severity letter, MMDD, time (00:00:<epoch seconds> before absl is
# initialised), thread id, file:line].
_NATIVE_RECORD = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]\s]+:\d+\] ")
_SEVERITIES = "IWEF"  # a record shows when its position here >= TF_CPP_MIN_LOG_LEVEL
# TensorFlow Lite's own logger writes "INFO: ..." (e.g. on creating its XNNPACK delegate)
# whatever TF_CPP_MIN_LOG_LEVEL says; these take the same levels.
_LITE_RECORD = re.compile(r"(INFO|WARNING|ERROR): ")
_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# On a machine with no CUDA driver at all, cuInit failing is that fact again, as an error.
_NO_DRIVER = "Could not find cuda drivers on your machine"
_NO_DRIVER_ECHO = "failed call to cuInit"


def resolve_level(
    flag: str | None = None, verbose: bool = False, default: str = "INFO"
) -> tuple[str, str | None]:
    """The level of our loggers: DEBUG when verbose, else the flag, CONVSTACK_LOG_LEVEL or
    `default`; and the complaint when a name given is not a level (then `default` holds)."""
    if verbose:
        return "DEBUG", None
    for source, value in (("--log-level", flag), (LEVEL_ENV, os.environ.get(LEVEL_ENV))):
        if value:
            if value.upper() in LEVELS:
                return value.upper(), None
            return default, f"{source}={value!r} is not one of {', '.join(LEVELS)}; using {default}"
    return default, None


def configure_logging(
    verbose: bool = False, level: str | None = None, default: str = "INFO", fmt: str = FORMAT
) -> str:
    """Our lines on stderr at the resolved level (see resolve_level); at DEBUG, TensorFlow's
    own lines and warnings too. Must run before TensorFlow is imported. Returns the level."""
    level, complaint = resolve_level(level, verbose, default)
    quiet = level != "DEBUG"
    os.environ.setdefault(TF_LEVEL_ENV, QUIET_TF_LEVEL if quiet else "0")
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    if complaint:
        logging.getLogger(__name__).warning(complaint)
    if quiet:
        for name in ("tensorflow", "absl"):
            logging.getLogger(name).setLevel(logging.WARNING)
        for message, module in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning, module=module)
        filter_tensorflow_start_up()
    return level


def tf_min_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as a number (0 when unset or unreadable, as TensorFlow reads it)."""
    try:
        return max(0, int(os.environ.get(TF_LEVEL_ENV, "0")))
    except ValueError:
        return 0


def filter_native_lines(lines: Iterable[str], min_level: int) -> list[str]:
    """The C++ lines TensorFlow would have kept at TF_CPP_MIN_LOG_LEVEL `min_level`: records
    below it go with their continuation lines, and so do absl's not-initialised banner and,
    when the machine has no CUDA driver, the cuInit failure that only repeats it."""
    lines = list(lines)
    no_driver = any(_NO_DRIVER in line for line in lines)
    kept: list[str] = []
    dropping = False
    for line in lines:
        if line.rstrip("\r\n") == _BANNER:
            continue
        severity = _severity(line)
        if severity is not None:
            dropping = severity < min_level or (no_driver and _NO_DRIVER_ECHO in line)
        if not dropping:
            kept.append(line)
    return kept


def _severity(line: str) -> int | None:
    """A native record's severity as TF_CPP_MIN_LOG_LEVEL counts it; None for other lines."""
    record = _NATIVE_RECORD.match(line)
    if record:
        return _SEVERITIES.index(record[1])
    lite = _LITE_RECORD.match(line)
    return _SEVERITIES.index(lite[1][0]) if lite else None


# Descriptor 2 and sys.stderr are the process's: one capture at a time (a server loads versions
# on several threads), or the second would save the first's capture and restore it at its end,
# sending the rest of the process's stderr into a deleted file. Nesting in one thread is LIFO.
_CAPTURE_LOCK = threading.RLock()


@contextlib.contextmanager
def native_stderr_filtered(min_level: int) -> Iterator[None]:
    """Capture what C++ writes to file descriptor 2 while the block runs, then write it out
    through filter_native_lines. Python's own writes (sys.stderr, logging) bypass the capture
    and appear at once, so a line printed just before os._exit is not lost. Other threads'
    captures wait for this one."""
    with _CAPTURE_LOCK, _captured_stderr(min_level):
        yield


@contextlib.contextmanager
def _captured_stderr(min_level: int) -> Iterator[None]:
    python_stderr = sys.stderr
    python_stderr.flush()
    saved = os.dup(2)
    direct = io.TextIOWrapper(
        os.fdopen(saved, "wb", closefd=False), encoding="utf-8", errors="backslashreplace",
        line_buffering=True,
    )  # fmt: skip
    handlers = [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler) and handler.stream is python_stderr
    ]
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        sys.stderr = direct
        for handler in handlers:
            handler.setStream(direct)
        try:
            yield
        finally:
            direct.flush()
            for handler in handlers:
                handler.setStream(python_stderr)
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="backslashreplace")
            python_stderr.write("".join(filter_native_lines(text.splitlines(True), min_level)))
            python_stderr.flush()


@contextlib.contextmanager
def quiet_tflite_deprecation() -> Iterator[None]:
    """TF 2.21's warning that tf.lite.Interpreter moves to ai_edge_litert (it still works),
    given on every construction (int8 calibration constructs one too), silenced inside."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        yield


@contextlib.contextmanager
def quiet_tflite_interpreter() -> Iterator[None]:
    """Build a tf.lite.Interpreter and allocate its tensors inside: its deprecation warning is
    silenced, and what TFLite writes to descriptor 2 on the first allocation in a process (its
    XNNPACK delegate's INFO line, which ignores TF_CPP_MIN_LOG_LEVEL) is filtered to that level."""
    with quiet_tflite_deprecation(), native_stderr_filtered(tf_min_level()):
        yield


class _FilteredStartUp(importlib.abc.Loader):
    """TensorFlow's own loader, run with native stderr filtered; the first device search
    (where cuInit reports) happens inside too."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with native_stderr_filtered(tf_min_level()):
            self._loader.exec_module(module)
            module.config.list_physical_devices()

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _TensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first `import tensorflow` it steps aside and wraps the
    real loader in _FilteredStartUp."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        _remove_finder()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredStartUp(spec.loader)
        return spec


def filter_tensorflow_start_up() -> None:
    """Filter the native lines of TensorFlow's start-up (see native_stderr_filtered) when it
    is imported later in this process; nothing if it already is."""
    if "tensorflow" in sys.modules or _finder() is not None:
        return
    sys.meta_path.insert(0, _TensorFlowFinder())


def _finder() -> _TensorFlowFinder | None:
    return next((f for f in sys.meta_path if isinstance(f, _TensorFlowFinder)), None)


def _remove_finder() -> None:
    finder = _finder()
    if finder is not None:
        sys.meta_path.remove(finder)
