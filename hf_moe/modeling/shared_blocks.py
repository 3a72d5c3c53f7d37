"""WideNet block sharing (Xue et al. 2021, "Go Wider Instead of Deeper"): every layer of a stack applies the weights
of one block, and keeps its own LayerNorms (and, with `per_layer_router`, its own router).

Sharing is transformers' weight tying, not one block reused in a loop: each layer stays its own module, because
attention modules carry their layer index (the KV cache slot) and MoE blocks their own counters and routing buffers.
Every parameter of block i > 0 is tied to the parameter of the same name in the first block that has it (MoE layers
tie to MoE layers, dense FFNs to dense FFNs; T5's relative position bias lives in block 0 only). So
`named_parameters()` and the optimizer see one copy, the gradients of every layer accumulate into it,
`save_pretrained` writes it once and `from_pretrained` ties the other names to it again.

The experts are the exception: they hold no per-layer state, and every MoE layer calls the first layer's experts
module itself (`share_experts_modules`). Expert parallelism makes each experts module an FSDP2 unit, and FSDP2 keeps a
parameter tied only inside one unit; one module is one unit. The other shared weights stay in FSDP2's root unit
(`MoePreTrainedMixin.init_parallel_plans`).

Buffers are not shared: hash tables, the aux-loss-free balancing bias and the load counters stay per layer (each
layer routes its own inputs).

Hub portability: this file travels with every saved checkpoint; only torch and single-dot siblings.
"""

from __future__ import annotations

import re

from torch import nn

from .moe_parts import moe_part_kind

__all__ = ["share_experts_modules", "shared_block_groups", "shared_block_ties", "tied_weights_patterns"]


def share_experts_modules(blocks: nn.ModuleList, config) -> None:
    """Under `config.share_blocks_across_layers`, make every block's experts module the first block's of the same
    name (before the weights are initialized)."""
    if not config.share_blocks_across_layers:
        return
    first_owner: dict[str, nn.Module] = {}
    for block in blocks:
        for name, module in list(block.named_modules()):
            if moe_part_kind(module) != "experts":
                continue
            owner = first_owner.setdefault(name, module)
            if owner is not module:
                parent, _, attribute = name.rpartition(".")
                setattr(block.get_submodule(parent), attribute, owner)


def shared_block_ties(stack_name: str, blocks: nn.ModuleList, config, norm_types: tuple[type, ...]) -> dict[str, str]:
    """`{tied name: source name}` for the blocks of one stack (names `{stack_name}.{index}.{...}`, relative to the
    module holding the stack), empty unless `config.share_blocks_across_layers`. Modules of `norm_types`, and routers
    with `config.per_layer_router`, keep their own parameters in every layer."""
    if not config.share_blocks_across_layers:
        return {}
    ties: dict[str, str] = {}
    first_owner: dict[str, str] = {}  # name inside a block -> the first block's full name of it
    for index, block in enumerate(blocks):
        own_prefixes = tuple(
            f"{name}." for name, module in block.named_modules() if _keeps_own_parameters(module, config, norm_types)
        )
        for relative, _ in block.named_parameters(remove_duplicate=False):
            if relative.startswith(own_prefixes):
                continue
            name = f"{stack_name}.{index}.{relative}"
            source = first_owner.setdefault(relative, name)
            if source != name:
                ties[name] = source
    return ties


def tied_weights_patterns(ties: dict[str, str]) -> dict[str, str]:
    """The ties as `_tied_weights_keys` entries: exact-name patterns. transformers' save searches every state-dict name
    for these patterns (prefixed with the owner's module name) to choose the copies it leaves out of the file, and
    `get_expanded_tied_weights_keys` anchors them at the start."""
    return {re.escape(target) + "$": re.escape(source) + "$" for target, source in ties.items()}


def _keeps_own_parameters(module: nn.Module, config, norm_types: tuple[type, ...]) -> bool:
    return isinstance(module, norm_types) or (config.per_layer_router and moe_part_kind(module) == "router")


def shared_block_groups(model: nn.Module) -> list[list[tuple[int, str]]]:
    """Every weight that block sharing ties in `model`: per weight, the (block index, qualified name) of each layer
    that applies it, the stored one first."""
    groups = []
    for prefix, module in model.named_modules():
        ties = getattr(module, "_shared_block_ties", None)
        if not ties:
            continue
        by_source: dict[str, list[str]] = {}
        for target, source in ties.items():
            by_source.setdefault(source, [source]).append(target)
        for names in by_source.values():
            # names are `{stack}.{index}.{...}` (`shared_block_ties`)
            groups.append([(int(name.split(".")[1]), f"{prefix}.{name}" if prefix else name) for name in names])
    return groups
