"""Which TensorFlow CPU kernels the server runs, chosen before TensorFlow starts.

TensorFlow's oneDNN kernels (on by default on x86) abort the whole process on some malformed
inputs instead of failing the op: a rank-3 tensor fed to a Conv2D ends in `Check failed: index
>= 0 && index < num_total_dims` and SIGABRT. TF Serving leaves shapes to the kernels, and so do
we, so the server defaults to TensorFlow's plain Eigen kernels, which answer the same input with
INVALID_ARGUMENT ("convolution input must be 4-dimensional"). They are slower: on the digits
model, one thread, TensorFlow 2.21, a session call takes 0.42 ms at batch 1 and 6.97 ms at batch
32 against oneDNN's 0.36 and 3.87 ms (an earlier note here had Eigen faster at batch 1; it is
not). TensorFlow reads the switch once, at its first op, so this must run before anything in the
process uses TensorFlow.
"""

from __future__ import annotations

import os

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
_OFF = {"0", "false", "False", "FALSE"}


def use_plain_cpu_kernels() -> None:
    """Turn oneDNN off for this process unless the environment already chose."""
    os.environ.setdefault(ONEDNN_ENV, "0")


def onednn_requested() -> bool:
    """Whether the environment asks for oneDNN kernels (then a malformed request may abort)."""
    return os.environ.get(ONEDNN_ENV, "1") not in _OFF
