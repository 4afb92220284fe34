"""What a normal run shows on stderr: our lines and real warnings, not TensorFlow's chatter; at
DEBUG (CONVSTACK_LOG_LEVEL or --verbose) TensorFlow's lines come back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from convstack.common.logs import filter_native_lines, resolve_level

# As TensorFlow 2.21 writes them at import, before absl is initialised (whatever the level).
START_UP = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796227331.530557   29809 port.cc:153] oneDNN custom operations are on.\n",
    "I0000 00:00:1796227331.532137   29809 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.\n",
    "I0000 00:00:1796227505.275074    7939 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.\n",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow.\n",
    "E0000 00:00:1796227338.923039   29809 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n",
]
REAL_ERROR = "E0000 00:00:1796227340.000001   29809 op_kernel.cc:1841] OP_REQUIRES failed\n"
WARNING_RECORD = "W0000 00:00:1796227340.000002   29809 loader.cc:12] slow load\n"


def test_start_up_records_below_the_level_go_with_their_continuation_lines():
    kept = filter_native_lines([*START_UP, WARNING_RECORD, REAL_ERROR, "free text\n"], 2)
    assert kept == [REAL_ERROR, "free text\n"]  # free text after a kept record is kept


def test_cuinit_failure_is_kept_where_a_cuda_driver_exists():
    cuinit = START_UP[-1]
    assert filter_native_lines([cuinit], 2) == [cuinit]
    assert filter_native_lines([START_UP[2], cuinit], 2) == []  # no driver: it says nothing


def test_tensorflow_lite_records_take_the_same_levels():
    delegate = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
    failure = "ERROR: Didn't find op for builtin opcode 'CONV_2D' version '9'.\n"
    assert filter_native_lines([delegate, failure], 2) == [failure]
    assert filter_native_lines([delegate], 0) == [delegate]


def test_each_tf_level_keeps_what_tensorflow_would():
    lines = [START_UP[1], WARNING_RECORD, REAL_ERROR]
    assert filter_native_lines(lines, 0) == lines
    assert filter_native_lines(lines, 1) == [WARNING_RECORD, REAL_ERROR]
    assert filter_native_lines(lines, 3) == []


def test_level_comes_from_verbose_then_flag_then_environment(monkeypatch):
    monkeypatch.setenv("CONVSTACK_LOG_LEVEL", "warning")
    assert resolve_level() == ("WARNING", None)
    assert resolve_level("error") == ("ERROR", None)
    assert resolve_level("error", verbose=True) == ("DEBUG", None)
    monkeypatch.setenv("CONVSTACK_LOG_LEVEL", "LOUD")
    level, complaint = resolve_level()
    assert level == "INFO"
    assert (
        complaint
        == "CONVSTACK_LOG_LEVEL='LOUD' is not one of DEBUG, INFO, WARNING, ERROR; using INFO"
    )


# A process that sets logging up, then imports TensorFlow, uses a distributed dataset (the
# tf.data warning), logs at INFO on the tensorflow logger and gives a warning of its own.
PROGRAM = """
import logging, warnings
from convstack.common.logs import configure_logging
configure_logging()
logging.getLogger("convstack.x").info("our line")
import tensorflow as tf
tf.get_logger().info("tensorflow INFO line")
strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
dataset = tf.data.Dataset.range(4).batch(2)
@tf.function
def first(d):
    d.options()
    return 0
first(dataset)
warnings.warn("a warning of ours", UserWarning)
logging.getLogger("convstack.x").info("done")
"""


def _run(env_extra: dict[str, str], program: str = PROGRAM, *args: str) -> str:
    """`program`'s stderr, run in a normal user's environment plus `env_extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",)}
    env.pop("CONVSTACK_LOG_LEVEL", None)
    result = subprocess.run(
        [sys.executable, "-c", program, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, **env_extra},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.mark.slow
def test_a_normal_run_shows_our_lines_and_real_warnings_only():
    stderr = _run({})
    lines = stderr.splitlines()
    assert "our line" in lines[0] and "done" in lines[-1]
    assert "UserWarning: a warning of ours" in stderr
    for noise in (
        "absl::InitializeLog",
        "I0000",
        "cuInit",
        "tensorflow INFO line",
        "tf.data options",
    ):
        assert noise not in stderr
    assert len(lines) == 3, stderr  # our two lines and the warning (no source line for -c)


@pytest.mark.slow
def test_debug_brings_tensorflow_back():
    stderr = _run({"CONVSTACK_LOG_LEVEL": "DEBUG"})
    assert "I0000" in stderr and "tensorflow INFO line" in stderr
    assert "tf.data options" in stderr


# A process that sets logging up and loads a TFLite model as the server does: the interpreter's
# first allocation logs TFLite's XNNPACK notice whatever TF_CPP_MIN_LOG_LEVEL says.
LITE_PROGRAM = """
import logging, shutil, sys, tempfile
from pathlib import Path
from convstack.common.logs import configure_logging
configure_logging()
from convstack.serving.tflite import load_tflite_version
root = Path(tempfile.mkdtemp())
shutil.copytree(sys.argv[1], root / "m")
load_tflite_version("m", 123, root / "m" / "00000123")
logging.getLogger("convstack.x").info("loaded")
"""


def _run_lite(env_extra: dict[str, str]) -> str:
    from tests.serving.conformance.conftest import upstream_testdata

    model = upstream_testdata() / "saved_model_half_plus_two_tflite"
    return _run(env_extra, LITE_PROGRAM, str(model))


@pytest.mark.slow
def test_loading_a_tflite_model_says_nothing_of_tflite_s_own_unless_at_debug():
    lines = _run_lite({}).splitlines()
    assert len(lines) == 1 and lines[0].endswith("INFO convstack.x: loaded"), lines
    assert "XNNPACK delegate" in _run_lite({"CONVSTACK_LOG_LEVEL": "DEBUG"})


# Two threads capture descriptor 2 in turn, the second starting before the first ends (as two
# versions loading at once may): afterwards the process's stderr must still reach the terminal.
OVERLAPPING_CAPTURES = """
import os, threading
from convstack.common.logs import native_stderr_filtered
first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
def first():
    with native_stderr_filtered(2):
        first_in.set()
        second_in.wait(2)
    first_out.set()
def second():
    first_in.wait(10)
    with native_stderr_filtered(2):
        second_in.set()
        first_out.wait(10)
threads = [threading.Thread(target=first), threading.Thread(target=second)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
os.write(2, b"still on stderr\\n")
"""


def test_captures_on_two_threads_leave_stderr_where_it_was():
    assert _run({}, OVERLAPPING_CAPTURES).splitlines() == ["still on stderr"]
