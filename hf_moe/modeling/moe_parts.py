"""The one way to find a model's MoE parts: blocks, routers, experts.

Each part's class says what it is in a `moe_part` class attribute ("block", "router", "experts", "shared_experts"). Found by that text,
not by class: a checkpoint loaded with `trust_remote_code=True` brings its own copies of these classes, which are not
hf_moe's objects but carry the same marker. Callbacks, optimizer presets, schedules, parallel helpers and the demo all
go through here.

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

from torch import nn

__all__ = ["MOE_PART_KINDS", "moe_blocks", "moe_experts", "moe_part_kind", "moe_parts", "moe_routers"]

MOE_PART_KINDS = ("block", "router", "experts", "shared_experts")


def moe_part_kind(module: nn.Module) -> str | None:
    """ "block", "router", "experts", "shared_experts", or None for a module that is no MoE part."""
    return getattr(type(module), "moe_part", None)


def moe_parts(model: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    """The model's MoE parts of one kind as (qualified name, module), in module order."""
    if kind not in MOE_PART_KINDS:
        raise ValueError(f"kind must be one of {MOE_PART_KINDS}, got {kind!r}")
    return [(name, module) for name, module in model.named_modules() if moe_part_kind(module) == kind]


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """MoE blocks in module order; index i is the `moe/layer_{i:02d}` of the training metrics."""
    return moe_parts(model, "block")


def moe_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return moe_parts(model, "router")


def moe_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return moe_parts(model, "experts")
