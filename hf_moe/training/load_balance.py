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

Router diagnostics (`enable_router_diagnostics`, on under `LoadBalanceCallback`): the top-k boundary margin is counted
by the blocks like every counter (a sum and a fixed log-spaced histogram, so windows and ranks merge by summing and the
5th percentile survives the merge); the expert bias (`expert_bias_metrics`) and the routing stability of a fixed probe
(`RouterProbe`) are read from the routers when a log is written.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..modeling._compat import mesh_data_parallel_group
from ..modeling.moe_parts import moe_blocks
from ..modeling.routing import RoutingInputs
from ..modeling.sparse_moe import SparseMoeBlock

__all__ = [
    "CounterAccumulator",
    "RouterProbe",
    "counter_reduce_group",
    "collect_moe_metrics",
    "enable_router_diagnostics",
    "expert_bias_metrics",
    "layer_metrics",
    "metrics_from_counts",
    "model_summary",
    "moe_blocks",
    "per_layer_metrics",
    "topk_margin_quantile",
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


def enable_router_diagnostics(model: nn.Module, enabled: bool = True) -> None:
    """Turn the blocks' router diagnostics (the top-k margin counters) on or off for every MoE block of `model`.

    Off by default, so that training and inference without `LoadBalanceCallback` pay nothing; on, each counted forward
    of a token-choice top-k layer costs one top-(k+1) over the routing scores and a 64-bin scatter, with no host sync.
    Blocks saved by hf_moe 0.1 (remote code) have no such counters and are left alone.
    """
    for _, block in moe_blocks(model):
        if hasattr(block, "diagnostics"):
            block.diagnostics = enabled


def topk_margin_quantile(histogram_B: torch.Tensor, q: float) -> float:
    """The `q`-quantile of the margins counted in a `topk_margin_histogram` (the bins of `SparseMoeBlock`),
    interpolated inside its bin (log-linearly; linearly in bin 0, [0, TOPK_MARGIN_MIN)): exact to one bin, a factor
    1.25. NaN for an empty histogram."""
    counts = histogram_B.double().tolist()
    rank = q * sum(counts)
    low = math.log10(SparseMoeBlock.TOPK_MARGIN_MIN)
    step = -low / (len(counts) - 1)
    cumulative = 0.0
    for index, count in enumerate(counts):
        if count > 0 and cumulative + count >= rank:
            fraction = (rank - cumulative) / count
            if index == 0:
                return fraction * SparseMoeBlock.TOPK_MARGIN_MIN
            return 10.0 ** (low + (index - 1 + fraction) * step)
        cumulative += count
    return math.nan


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
    - load_diversity: exp(entropy of the assignment distribution over experts) / E, the effective number of experts
      in use as a share of E: 1 is uniform load, 1/E everything on one expert
    - topk_margin_mean, topk_margin_p05: mean and 5th percentile over tokens of the gap between the k-th and the
      (k+1)-th selection score (routing probability, plus the expert bias with bias balancing); only with router
      diagnostics on, for token-choice top-k layers with k < E
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
    fraction_E = routed_E / total
    metrics["load_diversity"] = math.exp(torch.special.entr(fraction_E).sum().item()) / routed_E.numel()
    histogram_B = counts.get("topk_margin_histogram")
    if histogram_B is not None and histogram_B.sum().item() > 0:  # diagnostics on, a layer with a top-k boundary
        metrics["topk_margin_mean"] = counts["topk_margin_sum"].item() / histogram_B.sum().item()
        metrics["topk_margin_p05"] = topk_margin_quantile(histogram_B, 0.05)
    return metrics


def model_summary(
    per_layer: list[dict[str, float]], per_layer_counts: list[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """Model-wide `moe/...` summaries over the layers that saw tokens.

    Means over layers (load_imbalance, cv, router_entropy, aux_loss, z_loss: the model's own aux loss is a mean over
    layers too; load_diversity; the top-k margins over the layers that have them), the worst layer
    (load_imbalance_max), totals (dead_experts) and a pooled ratio (dropped_fraction).
    """
    active = [(m, c) for m, c in zip(per_layer, per_layer_counts, strict=True) if m]
    if not active:
        return {}
    summary = {}
    means = ("load_imbalance", "cv", "router_entropy", "aux_loss", "z_loss", "experts_per_token", "load_diversity")
    for name in means + ("topk_margin_mean", "topk_margin_p05"):
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


def per_layer_metrics(per_layer: list[dict[str, float]], prefix: str = "moe", means: tuple[str, ...] = ()) -> dict:
    """Flat `{prefix}/layer_{i:02d}/{name}` metrics from one dict per block (empty for a block without them), and
    `{prefix}/{name}` for each name in `means`: its mean over the layers that have it."""
    metrics = {}
    for index, layer in enumerate(per_layer):
        metrics.update({f"{prefix}/layer_{index:02d}/{name}": value for name, value in layer.items()})
    for name in means:
        values = [layer[name] for layer in per_layer if name in layer]
        if values:
            metrics[f"{prefix}/{name}"] = sum(values) / len(values)
    return metrics


def expert_bias_metrics(blocks: list[nn.Module]) -> list[dict[str, float]]:
    """Per block, the expert bias of aux-loss-free balancing as it stands: bias_norm (L2 norm over the experts),
    bias_min, bias_max; {} for a block whose router balances without one. One host copy for all the layers."""
    biases = [block.router.expert_bias for block in blocks if getattr(block.router, "balances_with_bias", False)]
    if not biases:
        return [{} for _ in blocks]
    values = iter(torch.stack([torch.stack([b.norm(), b.min(), b.max()]) for b in biases]).double().cpu().tolist())
    return [
        dict(zip(("bias_norm", "bias_min", "bias_max"), next(values), strict=True))
        if getattr(block.router, "balances_with_bias", False)
        else {}
        for block in blocks
    ]


def _has_topk_boundary(block: nn.Module) -> bool:
    # as the block's margin counters (`SparseMoeBlock._count_topk_margin`): routers that take the top-k of a per-token
    # score; the others have no top-k set that a small change could flip
    return bool(getattr(block.router, "supports_expert_bias", False))


class RouterProbe:
    """Router stability: the share of a fixed set of probe tokens whose top-k expert set changed between two
    measurements (`topk_changed_fraction`), one measurement per training log.

    The probe of each token-choice top-k layer is the first `max_tokens` (token) rows of the layer's router input in
    the first counted training forward after `arm()` (padding left out), kept on the device. Each measurement routes
    it again in evaluation mode (no jitter or noise) without gradients, so what changes is the router itself: its
    weights, and its expert bias with bias balancing. The first measurement only sets the reference. Under data
    parallelism each rank probes its own tokens and the counts are summed over ranks (a collective: every rank
    measures at the same log). Layers whose router parameters are sharded DTensors (FSDP) cannot be routed outside
    the model's forward and report nothing, as do layers with k >= E.
    """

    def __init__(self, blocks: list[nn.Module], max_tokens: int = 512, group=None):
        self.blocks = blocks
        self.max_tokens = max_tokens
        self.group = group
        self.inputs: list[RoutingInputs | None] = [None] * len(blocks)
        self.previous_TK: list[torch.Tensor | None] = [None] * len(blocks)
        self._handles: list = []

    def arm(self) -> None:
        """Forget the probes; capture new ones in the next counted training forward of each layer."""
        from torch.distributed.tensor import DTensor

        self.remove()
        self.inputs = [None] * len(self.blocks)
        self.previous_TK = [None] * len(self.blocks)
        for index, block in enumerate(self.blocks):
            router = block.router
            if _has_topk_boundary(block) and not any(isinstance(p, DTensor) for p in router.parameters()):
                self._handles.append(router.register_forward_pre_hook(self._capture_hook(index, block)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _capture_hook(self, index: int, block: nn.Module):
        def hook(router, args):
            if self.inputs[index] is not None or not (router.training and block.counting):
                return
            inputs = args[0]
            first = slice(0, self.max_tokens)
            # device copies only: the padding is left out at the first measurement, where a host sync is fine
            self.inputs[index] = inputs._replace(
                hidden_TD=inputs.hidden_TD[first].detach().clone(),
                num_sequences=1,
                token_mask_T=None if inputs.token_mask_T is None else inputs.token_mask_T[first].clone(),
                input_ids_T=None if inputs.input_ids_T is None else inputs.input_ids_T[first].clone(),
            )

        return hook

    @torch.no_grad()
    def _route(self, index: int) -> torch.Tensor:
        inputs = self.inputs[index]
        if inputs.token_mask_T is not None:
            keep_T = inputs.token_mask_T != 0
            inputs = inputs._replace(
                hidden_TD=inputs.hidden_TD[keep_T],
                token_mask_T=None,
                input_ids_T=None if inputs.input_ids_T is None else inputs.input_ids_T[keep_T],
            )
            self.inputs[index] = inputs
        router = self.blocks[index].router
        training = router.training
        router.train(False)
        try:
            # `forward`, not `__call__`: a measurement, not a routing of the model's, so no hook sees it (recorders,
            # the probe's own capture)
            top_k_index_TK = router.forward(inputs).top_k_index_TK
        finally:
            router.train(training)
        return top_k_index_TK.sort(dim=-1).values  # a set: the order of the k experts does not matter

    def changed_fractions(self) -> list[dict[str, float]]:
        """Per block, {"topk_changed_fraction": share of probe tokens whose top-k set changed since the previous
        call}; {} where there is nothing to compare yet (or no top-k boundary)."""
        changed_L2 = torch.zeros(len(self.blocks), 2, dtype=torch.float64)  # (changed, probed) per layer
        for index, block in enumerate(self.blocks):
            if self.inputs[index] is None or block.router.top_k >= block.num_experts:
                continue
            current_TK, previous_TK = self._route(index), self.previous_TK[index]
            self.previous_TK[index] = current_TK
            if previous_TK is None:
                continue
            # a new k (a schedule) changes every set
            same = current_TK.shape == previous_TK.shape
            changed = (current_TK != previous_TK).any(dim=-1).sum().item() if same else current_TK.shape[0]
            changed_L2[index] = torch.tensor([changed, current_TK.shape[0]], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            device = self.blocks[0].num_tokens.device if self.blocks else torch.device("cpu")
            summed_L2 = changed_L2.to(device)
            dist.all_reduce(summed_L2, op=dist.ReduceOp.SUM, group=self.group)
            changed_L2 = summed_L2.cpu()
        return [{"topk_changed_fraction": c / n} if n > 0 else {} for c, n in changed_L2.tolist()]


def collect_moe_metrics(model: nn.Module, prefix: str = "moe", per_expert: bool = True) -> dict[str, float]:
    """Metrics of everything the model's MoE blocks counted since their last reset, then reset them.

    For custom training loops; summed over ranks when torch.distributed is initialized (a collective: call it on
    every rank). Under DDP with `broadcast_buffers=True`, counts older than the last forward are rank 0's only; use
    `LoadBalanceCallback` (or harvest a `CounterAccumulator` after every micro-batch) to count every rank.
    """
    accumulator = CounterAccumulator([block for _, block in moe_blocks(model)], counter_reduce_group(model))
    accumulator.harvest()
    return metrics_from_counts(accumulator.reduce_and_reset(), prefix=prefix, per_expert=per_expert)
