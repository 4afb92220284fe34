"""Shared fixtures. TensorFlow is imported lazily by the tests that need it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Quiet TensorFlow's C++ start-up logging in test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The server's kernels (serving/kernels.py): in-process servables see what `convstack serve` runs.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# Tests that compare 1 and 2 replicas need two logical CPUs, and TensorFlow only allows the split
# before it initialises its devices, so the whole test process gets them up front.
TEST_CPU_DEVICES = 2


def pytest_configure(config):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(TEST_CPU_DEVICES)]
    )


@pytest.fixture(scope="session")
def exported_version() -> Path:
    """The tiny model's version, exported once per test process by the trainer (signatures,
    warmup records, model card); tests copy it, never write into it."""
    from tests.serving import helpers

    return helpers.exported_version()
