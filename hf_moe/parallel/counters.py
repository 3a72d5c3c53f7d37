"""Routing counters under expert parallelism: which ranks to sum over, so that nothing is counted twice.

Each `SparseMoeBlock` counts the (token, expert) assignments of the tokens *its rank routed*, against global expert
ids (the router is replicated; only the experts are split). With the layouts GPT-2 / T5 MoE support (`tp_size=1`,
`pp_size=1`) every rank routes a distinct batch, so the sum over all ranks is the global count: the same numbers one
process would count on the concatenated micro-batches. The expert-side all-to-all does not touch the counters, so
the experts' owner never counts a token again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["counter_reduce_group", "reduce_counters_"]


def counter_reduce_group(model: nn.Module):
    """The process group over which to sum routing counters: `None` (the default group) when every rank routes its
    own batch, the data-parallel group when ranks share batches (tensor parallelism, for models that have it)."""
    distributed_config = getattr(getattr(model, "config", None), "distributed_config", None)
    if distributed_config is None or not dist.is_initialized():
        return None
    if distributed_config.tp_size == 1 and distributed_config.pp_size == 1:
        return None
    if distributed_config.pp_size > 1:
        raise NotImplementedError("routing counters under pipeline parallelism: each stage holds different layers")
    # ranks of a TP group share one batch: sum over the ranks holding distinct batches only
    mesh = model._mesh_manager.get_mesh(("dp_replicate", "fsdp"))
    return mesh._flatten().get_group() if mesh.ndim > 1 else mesh.get_group()


@torch.no_grad()
def reduce_counters_(model: nn.Module) -> None:
    """Sum every MoE block's counters over `counter_reduce_group(model)`, in place (one all-reduce per layer).

    Collective: every rank must call it. A no-op on one process.
    """
    if not dist.is_initialized():
        return
    group = counter_reduce_group(model)
    for module in model.modules():
        names = getattr(module, "COUNTERS", None)
        if names is None or getattr(module, "COUNTER_REDUCTION", "sum") != "sum":
            continue
        flat = torch.cat([getattr(module, name).reshape(-1) for name in names])
        dist.all_reduce(flat, group=group)
        offset = 0
        for name in names:
            buffer = getattr(module, name)
            buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()
