"""Logging set-up shared by the long-running verbs (train, serve)."""

from __future__ import annotations

import logging
import os
import sys


def configure_logging() -> None:
    """INFO lines with time, level and logger on stderr; TensorFlow's C++ start-up chatter off
    unless the caller asked for it (must run before TensorFlow is imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
