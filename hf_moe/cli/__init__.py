"""The `hf-moe` command line: one module per subcommand, each a thin parser over a library function.

This package and the subcommand modules import only the standard library at import time: `hf-moe --help` and a
parse error must answer in a blink, and torch / transformers take seconds to import. What the subcommands share lives
here: argument types that name what is allowed. (Whether a model source exists is `hf_moe.conversion.source`'s
question, asked before anything slow runs.)
"""

from __future__ import annotations

import argparse
import math

__all__ = [
    "AUX_LOSS_SCOPES",
    "LAYER_SPEC_SHORT",
    "add_balancing_options",
    "add_moe_layer_options",
    "mean_or_index",
    "non_negative_float",
    "positive_float",
    "positive_int",
]

# the layer specs `hf_moe.conversion.layer_selection` reads (its LAYER_SPEC_HELP says more; a test keeps them in step)
LAYER_SPEC_SHORT = "'all', 'none', 'every_other', 'top:N', 'bottom:N' or indices like '0,2'"
# hf_moe.modeling.losses.AUX_LOSS_SCOPES, which imports torch (tests/cli check that they match)
AUX_LOSS_SCOPES = ("micro_batch", "global_batch", "sequence")


def add_moe_layer_options(parser: argparse.ArgumentParser, verb: str) -> None:
    """--moe-layers (GPT-2), --encoder-moe-layers and --decoder-moe-layers (T5): which layers `verb` makes MoE."""
    parser.add_argument(
        "--moe-layers", metavar="SPEC", default=None, help=f"GPT-2 layers to {verb}: {LAYER_SPEC_SHORT} (default: all)"
    )
    parser.add_argument(
        "--encoder-moe-layers", metavar="SPEC", default=None, help="T5 encoder layers, same syntax (default: all)"
    )
    parser.add_argument(
        "--decoder-moe-layers", metavar="SPEC", default=None, help="T5 decoder layers, same syntax (default: all)"
    )


def add_balancing_options(parser: argparse.ArgumentParser) -> None:
    """--aux-loss-scope and --router-bias-update-rate: how the routers are kept balanced in training. Whether the
    balance loss and the router support them is the config's check (it names the field and what is allowed)."""
    parser.add_argument(
        "--aux-loss-scope",
        choices=AUX_LOSS_SCOPES,
        default=None,
        help="what the balance loss averages over: micro_batch (each forward's tokens), global_batch (expert loads "
        "of the optimizer step's micro-batches and data-parallel ranks, Qiu et al. 2025; the switch loss "
        "only) or sequence (each sequence, then the mean; DeepSeek-V3) (default: micro_batch)",
    )
    parser.add_argument(
        "--router-bias-update-rate",
        metavar="R",
        type=non_negative_float,
        default=None,
        help="aux-loss-free balancing (Wang et al. 2024; DeepSeek-V3) for the routers topk, noisy_topk: a per-expert "
        "selection bias moves by R towards balance after each optimizer step, under hf_moe's MoeTrainer or "
        "RouterBalancingCallback; the balance loss coefficient then defaults to 0; 0 is off (default: 0.0)",
    )


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option in the error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def mean_or_index(noun: str):
    """argparse type factory: 'mean' or an integer >= 0, which errors call `noun` (e.g. "an expert index >= 0").
    The upper bound needs the model, so the library checks it once the model is read."""

    def parse(text: str) -> str | int:
        if text == "mean":
            return text
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be 'mean' or {noun}, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 'mean' or {noun}, got {value}")
        return value

    return parse


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
