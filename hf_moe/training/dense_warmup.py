"""Dense warm-up (Dua et al. 2022, "Tricks for Training Sparse Translation Models", arXiv 2110.08246).

For the first `warmup_steps` optimizer steps all experts of a layer share one set of parameters (dense training of
one FFN per layer); then they are untied and each trains on the tokens routed to it.

Shape legend: E experts of a layer; each expert parameter is (E, ...) (`up_proj` (E, D, F), `down_proj` (E, F, D),
biases (E, F) / (E, D)).

How sharing is done without changing the model: the E slices of every expert parameter are kept bit-identical.
- At train begin (inside the warm-up) every slice is set to expert 0. Expert 0, not the mean of the experts: an
  upcycled model's experts are copies, so both keep its function, but the mean of E independently initialized experts
  has 1/E of their variance, which would shrink a model trained from scratch.
- Before every optimizer step of the warm-up each slice's gradient is replaced by the sum over the E slices: the
  gradient that one parameter shared by the E experts would get. Identical parameters, identical gradients and an
  elementwise optimizer (SGD, Adam/AdamW: their moments then stay identical too) give identical updates, and each
  update equals the shared parameter's. An optimizer that mixes elements across the E dimension (e.g. one that
  factors or orthogonalizes a 3D parameter as a whole) is outside this contract.
- From step `warmup_steps` on (`state.global_step`, 0-based, counts the steps taken) nothing is tied; the experts
  diverge because routing sends them different tokens.

Gradient clipping: `Trainer` clips (`max_grad_norm`) before `on_pre_optimizer_step`, so during the warm-up the norm
(and the logged `grad_norm`) is that of the untied per-expert gradients and the summed gradient is not clipped again.
Exact equality with a shared dense FFN therefore holds when the clip does not bite (or `max_grad_norm=0`).

Routers: nothing here depends on the router. While the experts are identical, a router whose top-k weights are
normalized gets no gradient from the task loss (every choice gives the same output); it still learns from its
auxiliary losses, and its balancing biases still move.

Resuming inside the warm-up works: the checkpoint holds identical experts and the optimizer state of identical
updates, and the callback re-ties from the restored `global_step` (a no-op copy of expert 0 onto itself).

Expert parallelism: an expert parameter may be a DTensor whose expert dimension is sharded over mesh dimensions
(`Shard(0)` over ep, FSDP's `_StridedShard(0)` over efsdp when `fsdp_size > ep_size`), every other mesh dimension
`Replicate`: the layouts transformers builds with `DistributedConfig(fsdp_size=..., ep_size=...)`. The sum over
experts adds the local experts and all-reduces over each sharding dimension's group; the tie broadcasts expert 0 from
the rank at coordinate 0 of those dimensions. A layout that splits an expert itself (tensor parallelism inside the
experts, a `Partial` placement) is refused with a `ValueError` at train begin. Each warm-up step costs one small
all-reduce per expert parameter and sharding dimension (a 1/E-sized slice of it).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from ..modeling.moe_parts import moe_experts

__all__ = ["DenseWarmupCallback", "expert_parameters", "sum_expert_gradients_", "tie_experts_"]

logger = logging.getLogger(__name__)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 3D (and bias) parameters of every experts module of `model`; dimension 0 indexes the experts."""
    params = {}  # by identity, once: WideNet's layers share one experts module's parameters
    for _, experts in moe_experts(model):
        params.update((id(p), p) for p in experts.parameters(recurse=False) if p.requires_grad)
    return list(params.values())


def _expert_groups(param: torch.Tensor) -> list[dist.ProcessGroup]:
    """The process groups of the mesh dimensions over which `param`'s expert dimension is sharded; empty when this
    rank holds every expert. Raises `ValueError` for a layout that splits an expert itself."""
    if not isinstance(param, DTensor):
        return []
    mesh, placements = param.device_mesh, param.placements
    # a mesh dimension of size 1 holds everything whatever its placement says
    used = [dim for dim in range(mesh.ndim) if mesh.size(dim) > 1]
    # Shard(0) and FSDP's _StridedShard(0) (not a Shard subclass, hence the `dim` test) split whole experts
    sharding = [
        dim for dim in used if not placements[dim].is_replicate() and getattr(placements[dim], "dim", None) == 0
    ]
    if any(not placements[dim].is_replicate() and dim not in sharding for dim in used):
        raise ValueError(
            "DenseWarmupCallback supports expert parameters sharded along the expert dimension only (expert "
            f"parallelism, FSDP over experts); got placements {placements} on {mesh}, which split an expert itself"
        )
    return [mesh.get_group(dim) for dim in sharding]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # under no_grad, to_local() is the local shard itself, so in-place writes reach the DTensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def tie_experts_(params: list[nn.Parameter]) -> None:
    """Set every expert slice of each parameter to expert 0 (collectives under expert parallelism: every rank calls
    it)."""
    for param in params:
        local = _local(param)
        first = local[:1].clone()
        # the rank at coordinate 0 of every sharding mesh dimension holds the first shard, so global expert 0; one
        # broadcast from coordinate 0 per dimension brings its value everywhere
        for group in _expert_groups(param):
            dist.broadcast(first, src=dist.get_global_rank(group, 0), group=group)
        local.copy_(first.expand_as(local))


@torch.no_grad()
def sum_expert_gradients_(params: list[nn.Parameter]) -> None:
    """Replace every expert slice's gradient by the sum over the experts of the layer (collectives under expert
    parallelism: every rank calls it). A missing gradient counts as zero and becomes the sum."""
    for param in params:
        groups = _expert_groups(param)
        local_grad = None if param.grad is None else _local(param.grad)
        summed = torch.zeros_like(_local(param)[:1]) if local_grad is None else local_grad.sum(dim=0, keepdim=True)
        for group in groups:  # the local experts' sum, then the other shards': a sum over every expert
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        if local_grad is None:
            local_grad = summed.expand_as(_local(param)).clone()
            param.grad = (
                DTensor.from_local(local_grad, param.device_mesh, param.placements, run_check=False)
                if isinstance(param, DTensor)
                else local_grad
            )
        else:
            local_grad.copy_(summed.expand_as(local_grad))


class DenseWarmupCallback(TrainerCallback):
    """Ties the experts of every MoE layer for the first `warmup_steps` optimizer steps (dense warm-up), then unties
    them. Works with `Trainer` and `MoeTrainer`, any router, DDP, and expert parallelism with the experts sharded only
    along the expert dimension (see the module docstring for the optimizer and clipping assumptions).

    Args:
        warmup_steps: optimizer steps (>= 1) during which the experts share one parameter set.
    """

    def __init__(self, warmup_steps: int):
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.params: list[nn.Parameter] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = expert_parameters(model)
        if not self.params:
            raise ValueError("DenseWarmupCallback: the model has no trainable MoE experts to tie")
        for param in self.params:
            _expert_groups(param)  # refuse an unsupported expert-parallel layout before any step
        if state.max_steps and self.warmup_steps >= state.max_steps:
            logger.warning(
                f"DenseWarmupCallback: warmup_steps={self.warmup_steps} >= max_steps={state.max_steps}, so the experts "
                "stay tied for the whole run."
            )
        if state.global_step < self.warmup_steps:  # global_step > 0 when resuming from a checkpoint
            tie_experts_(self.params)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step < self.warmup_steps:
            sum_expert_gradients_(self.params)
