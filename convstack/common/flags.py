"""argparse value types shared by the command lines: each names what was wrong in one line."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def whole_number(minimum: int, rule: str | None = None) -> Callable[[str], int]:
    """A type for whole numbers of at least `minimum`; `rule` words the bound for the user."""
    rule = rule or f"must be at least {minimum}"

    def parse(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{rule}, got {value}")
        return value

    parse.__name__ = f"whole_number_from_{minimum}"  # argparse names the type in errors
    return parse


positive_int = whole_number(1)


def positive_number(text: str) -> float:
    """A number above 0 (seconds, rates)."""
    value = _number(text, float)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def boolean(text: str) -> bool:
    """A boolean as absl flags spell it (`true`/`false`, `1`/`0`), for `--flag=true`."""
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"not true or false: {text!r}")
