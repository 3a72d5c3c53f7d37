"""The `hf-moe` command line: one module per subcommand, each a thin parser over a library function.

This package and the subcommand modules import only the standard library at import time: `hf-moe --help` and a
parse error must answer in a blink, and torch / transformers take seconds to import. What the subcommands share lives
here: argument types that name what is allowed. (Whether a model source exists is `hf_moe.conversion.source`'s
question, asked before anything slow runs.)
"""

from __future__ import annotations

import argparse
import math

__all__ = ["non_negative_float", "positive_float", "positive_int"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option in the error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _finite_float(text, "a finite number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _finite_float(text, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _finite_float(text: str, allowed: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
    if not math.isfinite(value):  # float() accepts 'nan' and 'inf'; neither is a capacity, a coefficient or a ratio
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
    return value
