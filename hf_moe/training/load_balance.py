"""Router load-balance metrics from the counters the MoE blocks keep (no extra forward passes).

Shape legend: L MoE layers (blocks, in module order), E experts of a layer.

Who owns what: each `SparseMoeBlock` adds to its counters in every forward; a `CounterAccumulator` moves them into
its own float64 totals and zeroes them ("harvest"), sums the totals over data-parallel ranks when asked for metrics,
and starts a new window. That sum is the one way counters are reduced across ranks. The metric functions here are
pure: counts in, floats out.

Under expert parallelism each block counts the (token, expert) assignments of the tokens *its rank routed*, against
global expert ids (the router is replicated; only the experts are split). With the layouts GPT-2 / T5 MoE support
(`tp_size=1`, `pp_size=1`) every rank routes a distinct batch, so the sum over all ranks is the global count: the same
numbers one process counts on the concatenated micro-batches. The experts' all-to-all does not touch the counters,
so the experts' owner never counts a token again (`counter_reduce_group`).

Metric names are stable: `moe/layer_{i:02d}/{name}` with `i` the block's position among the model's
MoE blocks in module order (for T5: the encoder's blocks, then the decoder's), plus model-wide `moe/{name}`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..modeling._compat import mesh_data_parallel_group
from ..modeling.moe_parts import moe_blocks

__all__ = [
    "CounterAccumulator",
    "counter_reduce_group",
    "collect_moe_metrics",
    "layer_metrics",
    "metrics_from_counts",
    "model_summary",
    "moe_blocks",
]


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
    return mesh_data_parallel_group(model)


class CounterAccumulator:
    """Sums the counters of a fixed list of MoE blocks over a logging window, in its own float64 tensor.

    Harvesting after every micro-batch, rather than reading the buffers once per window, is what makes the counts
    right under DistributedDataParallel: with `broadcast_buffers=True` (the default) DDP copies rank 0's buffers
    onto every rank at the start of each forward, which would overwrite the other ranks' counts. Zeroed right after
    each micro-batch, the buffers hold nothing worth keeping when that broadcast happens (rank 0 sends zeros), and
    the per-rank totals live here, outside the module, until `reduce_and_reset` sums them with `all_reduce`.
    """

    def __init__(self, blocks: list[nn.Module], group=None):
        self.blocks = blocks
        self.group = group  # the process group to sum over (`counter_reduce_group`); None: the default group
        # per block, per counter: (offset, size) in the flat totals vector, so one all_reduce serves every layer
        self.layout: list[dict[str, tuple[int, int]]] = []
        offset = 0
        for block in blocks:
            entry = {}
            for name in block.COUNTERS:
                size = getattr(block, name).numel()
                entry[name] = (offset, size)
                offset += size
            self.layout.append(entry)
        device = getattr(blocks[0], blocks[0].COUNTERS[0]).device if blocks else torch.device("cpu")
        self.totals = torch.zeros(offset, dtype=torch.float64, device=device)

    def harvest(self) -> None:
        """Move the blocks' counters into the totals and zero them (device ops only, no host sync)."""
        if not self.blocks:
            return
        flat = torch.cat([getattr(b, name).reshape(-1) for b in self.blocks for name in b.COUNTERS])
        self.totals += flat.to(self.totals.device, torch.float64)
        for block in self.blocks:
            block.reset_counters()

    def reset(self) -> None:
        self.totals.zero_()

    def reduce_and_reset(self) -> list[dict[str, torch.Tensor]]:
        """Per-layer counts of the window, summed over ranks when torch.distributed is initialized; then a new window.

        Every rank must call this at the same point (it is a collective when distributed); `Trainer` logs on every
        rank, so a callback's `on_log` qualifies.
        """
        totals = self.totals.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=self.group)
        self.reset()
        totals = totals.cpu()  # the one host sync of a logging step
        return [
            {
                name: totals[offset : offset + size].reshape(getattr(block, name).shape)
                for name, (offset, size) in entry.items()
            }
            for block, entry in zip(self.blocks, self.layout, strict=True)
        ]


def layer_metrics(counts: dict[str, torch.Tensor], per_expert: bool = True) -> dict[str, float]:
    """One layer's metrics from its summed counters; {} when the window saw no forward of this layer.

    - token_fraction_expert_{e:02d}: share of the (token, expert) assignments that went to expert e (sums to 1)
    - load_imbalance: max / mean assignments per expert (1 is perfect balance, E is everything on one expert)
    - cv: coefficient of variation (std / mean) of assignments per expert
    - router_entropy: mean entropy (nats) of the routing distribution per token; log(E) is uniform routing
    - dropped_fraction: share of assignments dropped by capacity
    - dead_experts: experts that received no assignment in the window
    - aux_loss, z_loss: this layer's load-balancing and z-loss, averaged over the window's forwards
    - tokens: tokens routed in the window (padding excluded; summed over ranks)
    - experts_per_token: mean experts that processed a token (K for top-k without drops; the dense-to-sparse gate's
      active experts; capacity_factor on average for expert choice)
    - unrouted_fraction: share of tokens no expert processed (expert choice; capacity drops of every slot)
    - balanced_forward_fraction: share of forwards whose per-expert loads differ by at most 1 token (BASE layers
      in training: 1.0; per rank under data parallelism)
    """
    routed_E = counts["routed_tokens_per_expert"].double()
    total = routed_E.sum().item()
    num_forwards = counts["num_forwards"].item()
    if num_forwards == 0 or total == 0:
        return {}
    mean = total / routed_E.numel()
    metrics = {}
    if per_expert:
        for expert, value in enumerate((routed_E / total).tolist()):
            metrics[f"token_fraction_expert_{expert:02d}"] = value
    metrics["load_imbalance"] = routed_E.max().item() / mean
    metrics["cv"] = routed_E.std(unbiased=False).item() / mean
    num_tokens = counts["num_tokens"].item()
    metrics["router_entropy"] = counts["router_entropy_sum"].item() / num_tokens if num_tokens else float("nan")
    metrics["dropped_fraction"] = counts["dropped_tokens_per_expert"].sum().item() / total
    metrics["dead_experts"] = float((routed_E == 0).sum().item())
    metrics["aux_loss"] = counts["balance_loss_sum"].item() / num_forwards
    metrics["z_loss"] = counts["z_loss_sum"].item() / num_forwards
    metrics["tokens"] = counts["num_tokens"].item()
    if "kept_slots_sum" in counts and num_tokens:  # absent from blocks saved by hf_moe 0.1 (remote code)
        metrics["experts_per_token"] = counts["kept_slots_sum"].item() / num_tokens
        metrics["unrouted_fraction"] = counts["tokens_without_expert"].item() / num_tokens
        metrics["balanced_forward_fraction"] = counts["balanced_forwards"].item() / num_forwards
    return metrics


def model_summary(
    per_layer: list[dict[str, float]], per_layer_counts: list[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """Model-wide `moe/...` summaries over the layers that saw tokens.

    Means over layers (load_imbalance, cv, router_entropy, aux_loss, z_loss: the model's own aux loss is a mean over
    layers too), the worst layer (load_imbalance_max), totals (dead_experts) and a pooled ratio (dropped_fraction).
    """
    active = [(m, c) for m, c in zip(per_layer, per_layer_counts, strict=True) if m]
    if not active:
        return {}
    summary = {}
    for name in ("load_imbalance", "cv", "router_entropy", "aux_loss", "z_loss", "experts_per_token"):
        values = [m[name] for m, _ in active if name in m and not math.isnan(m[name])]
        if values:
            summary[name] = sum(values) / len(values)
    summary["load_imbalance_max"] = max(m["load_imbalance"] for m, _ in active)
    summary["dead_experts"] = sum(m["dead_experts"] for m, _ in active)
    routed = sum(c["routed_tokens_per_expert"].sum().item() for _, c in active)
    dropped = sum(c["dropped_tokens_per_expert"].sum().item() for _, c in active)
    summary["dropped_fraction"] = dropped / routed
    return summary


def metrics_from_counts(
    per_layer_counts: list[dict[str, torch.Tensor]], prefix: str = "moe", per_expert: bool = True
) -> dict[str, float]:
    """Flat `{prefix}/layer_{i:02d}/{name}` and `{prefix}/{name}` metrics from per-layer counts."""
    per_layer = [layer_metrics(counts, per_expert=per_expert) for counts in per_layer_counts]
    metrics = {}
    for index, layer in enumerate(per_layer):
        metrics.update({f"{prefix}/layer_{index:02d}/{name}": value for name, value in layer.items()})
    metrics.update({f"{prefix}/{name}": value for name, value in model_summary(per_layer, per_layer_counts).items()})
    return metrics


def collect_moe_metrics(model: nn.Module, prefix: str = "moe", per_expert: bool = True) -> dict[str, float]:
    """Metrics of everything the model's MoE blocks counted since their last reset, then reset them.

    For custom training loops; summed over ranks when torch.distributed is initialized (a collective: call it on
    every rank). Under DDP with `broadcast_buffers=True`, counts older than the last forward are rank 0's only; use
    `LoadBalanceCallback` (or harvest a `CounterAccumulator` after every micro-batch) to count every rank.
    """
    accumulator = CounterAccumulator([block for _, block in moe_blocks(model)], counter_reduce_group(model))
    accumulator.harvest()
    return metrics_from_counts(accumulator.reduce_and_reset(), prefix=prefix, per_expert=per_expert)
