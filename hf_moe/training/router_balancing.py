"""What MoE routers do once per optimizer step: aux-loss-free bias balancing, and the end of a global batch.

Shape legend: E experts of a layer.

Aux-loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts";
DeepSeek-V3), `router_bias_update_rate > 0`: each token-choice router selects experts by probs + bias. After each
optimizer step the bias moves by rate * sign(mean load - load_e), the loads summed over every micro-batch of the step
(gradient accumulation) and over every rank. Global-batch balance loss (`aux_loss_scope="global_batch"`): the loads of
the step's micro-batches are summed in the loss module; a new step starts a new sum.

Who owns what:
- the router owns `expert_bias` (persistent) and `expert_load` (its selections since it was last drained); the block
  adds to `expert_load` in training forwards;
- `RouterBalancer` drains `expert_load` into its own totals after every micro-batch (`harvest`) and, after the
  optimizer step (`step`), sums the totals over ranks (one `all_reduce` for every layer), updates every bias and
  starts the next global batch. Draining after every micro-batch is what keeps the loads right under
  DistributedDataParallel: DDP copies rank 0's buffers onto every rank at the start of a synchronizing forward, and
  drained buffers hold nothing to lose (as for the load-balance counters, `load_balance.CounterAccumulator`).

`RouterBalancingCallback` runs the balancer under `Trainer`; `MoeTrainer` adds it by itself when the model needs it.
In a custom loop: `balancer = RouterBalancer(model)`, then `balancer.harvest()` after every backward and
`balancer.step()` after every `optimizer.step()`. Every bias moves identically on every rank, so the models stay
replicas, and a checkpoint taken between steps holds everything needed to resume exactly (the drained loads are 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from .load_balance import counter_reduce_group, moe_blocks

__all__ = ["RouterBalancer", "RouterBalancingCallback", "needs_router_balancing"]


def _balancing_blocks(model: nn.Module) -> list[nn.Module]:
    # blocks saved by hf_moe 0.1 (remote code) know nothing of per-step balancing
    return [block for _, block in moe_blocks(model) if getattr(block, "balances_per_optimizer_step", False)]


def needs_router_balancing(model: nn.Module) -> bool:
    """Whether `model` has routers that must be advanced once per optimizer step (bias balancing, global batch)."""
    return bool(_balancing_blocks(model))


class RouterBalancer:
    """Updates the expert biases and ends the global batch of every MoE layer of `model`, once per optimizer step."""

    def __init__(self, model: nn.Module):
        self.blocks = _balancing_blocks(model)
        self.routers = [block.router for block in self.blocks if getattr(block.router, "balances_with_bias", False)]
        self.group = counter_reduce_group(model)
        sizes = [router.expert_load.numel() for router in self.routers]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        device = self.routers[0].expert_load.device if self.routers else torch.device("cpu")
        # float64: a float32 count stops being exact beyond 2**24 selections of one expert in one step
        self.loads = torch.zeros(self.offsets[-1], dtype=torch.float64, device=device)

    def harvest(self) -> None:
        """Move the routers' selections since the last harvest into this balancer's totals (no host sync)."""
        if not self.routers:
            return
        self.loads += torch.cat([router.expert_load for router in self.routers]).to(self.loads)
        for router in self.routers:
            router.expert_load.zero_()

    def step(self) -> None:
        """After an optimizer step: update every bias from the step's loads (summed over ranks, a collective when
        distributed: every rank calls it), then start the next step's global batch."""
        self.harvest()
        if self.routers:
            loads = self.loads
            if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
                dist.all_reduce(loads, op=dist.ReduceOp.SUM, group=self.group)
            for router, start, end in zip(self.routers, self.offsets, self.offsets[1:], strict=False):
                router.update_expert_bias(loads[start:end])
            self.loads.zero_()
        for block in self.blocks:
            block.end_optimizer_step()

    def reset(self) -> None:
        """Forget what was counted so far (forwards before training, an evaluation in training mode)."""
        self.harvest()
        self.loads.zero_()
        for block in self.blocks:
            block.end_optimizer_step()


class RouterBalancingCallback(TrainerCallback):
    """Runs `RouterBalancer` under `Trainer`: drains the routers' loads after every micro-batch, updates the expert
    biases and starts a new global batch after every optimizer step. `MoeTrainer` adds it when the model needs it;
    with a plain `Trainer`, pass `callbacks=[RouterBalancingCallback()]`."""

    def __init__(self):
        self.balancer: RouterBalancer | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.balancer = RouterBalancer(model)
        self.balancer.reset()

    def on_substep_end(self, args, state, control, **kwargs):
        self.balancer.harvest()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.balancer.step()
