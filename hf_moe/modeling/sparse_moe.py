"""The sparse MoE block: router -> dispatch -> experts, the layer's router losses, and the routing counters.

Shape legend: B batch, S sequence, T = B*S tokens, D hidden size, E experts, K expert slots per token.

```
hidden (B,S,D) -> RoutingInputs(hidden_TD, B, token_mask_T, input_ids_T)
   router                         -> RouterDecision(logits_TE, top_k_index_TK, top_k_weights_TK)
   capacity (dispatch.py)         -> kept_TK or None (dropless)
   experts on the kept slots      -> out_TD                   (a dropped slot adds 0: the residual carries the token)
   + shared experts (optional)    -> out_TD -> (B,S,D)        (every token, `shared_experts.py`; Residual-MoE:
                                                               c_0 * dense MLP + c_1 * routed, c = softmax(x W + b))
   router losses (losses.py)      -> RouterLossValues(balance_loss, z_loss), recorded for the model's loss
   counters                       += this forward's assignments, drops, entropy, losses
```

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from ._compat import KeepsFloat32Buffers
from .dispatch import Capacity, run_experts
from .losses import assignment_counts, router_z_loss, sequence_mean
from .registry import BALANCE_LOSSES, build_router
from .routing import RouterDecision, RoutingInputs

__all__ = ["RouterLossValues", "RouterLosses", "SparseMoeBlock", "require_non_reentrant_checkpointing"]


def require_non_reentrant_checkpointing(gradient_checkpointing_func) -> None:
    """Refuse reentrant activation checkpointing, which would silently drop the router losses' gradients.

    The router losses leave each layer through transformers' output recorders, not through the layer's outputs.
    Reentrant checkpointing runs the first forward under `no_grad` and only differentiates the layer's outputs, so
    those losses would train nothing. Non-reentrant checkpointing (transformers' default) keeps them.
    """
    if getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant", False):
        raise ValueError(
            "MoE models need non-reentrant activation checkpointing: with use_reentrant=True the router losses get "
            "no gradient. Call activation_checkpointing_enable() without arguments, or pass "
            "{'use_reentrant': False}."
        )


class RouterLossValues(NamedTuple):
    """One layer's router losses (float32 scalars). A tuple, so `OutputRecorder(index=...)` records each."""

    balance_loss: torch.Tensor
    z_loss: torch.Tensor


class RouterLosses(KeepsFloat32Buffers, nn.Module):
    """Computes one layer's router losses from its routing decision: the balance loss `config.aux_loss_type` names
    (registry) over the tokens `config.aux_loss_scope` says, and the ST-MoE z-loss, padding excluded. A module of its
    own so that transformers' output recorders can collect every layer's losses for the model's loss; it holds no
    parameters.

    Global-batch scope, in training: `global_assignments_per_expert` (E,) and `global_slots` () are non-persistent
    float32 buffers holding the (token, expert) assignments of the optimizer step's micro-batches so far, summed over
    all ranks (one `all_reduce` of E + 1 detached numbers per layer and forward when torch.distributed is initialized:
    every rank routes a distinct batch with the layouts the families support). Added to in each counted forward,
    zeroed by `reset_global_batch` once per optimizer step (`hf_moe.training.RouterBalancer`). Micro-batch m of a step
    therefore sees the loads of micro-batches 1..m on every rank (Megatron-Core's global_aux_loss does the same): the
    later ones are not routed yet when its gradient is taken. In evaluation the loss is the micro-batch one.
    """

    float32_buffers = ("global_assignments_per_expert", "global_slots")

    def __init__(self, config, learned: bool = True):
        super().__init__()
        entry = BALANCE_LOSSES.entry(config.aux_loss_type)
        self.balance_loss = entry.loss
        self.global_batch_loss = entry.global_batch_loss
        self.scope = config.aux_loss_scope
        self.num_experts = config.num_local_experts
        # a router with nothing to learn (hash) gets zeros: its losses would only add a constant to the model's loss
        self.learned = learned
        if self.scope == "global_batch":
            self.register_buffer("global_assignments_per_expert", torch.zeros(self.num_experts), persistent=False)
            self.register_buffer("global_slots", torch.zeros(()), persistent=False)

    def forward(
        self,
        decision: RouterDecision,
        combine_weights_TK: torch.Tensor,
        token_mask_T: torch.Tensor | None,
        num_sequences: int = 1,
        counting: bool = True,
    ) -> RouterLossValues:
        """`counting=False` while activation checkpointing recomputes the forward: the global batch's loads then stay
        as the first run left them (this forward included), so the recomputed loss is the same."""
        if not self.learned:
            zero = decision.logits_TE.new_zeros((), dtype=torch.float32)
            return RouterLossValues(zero, zero)
        # float32 whatever the autocast dtype, like the routing itself
        with torch.autocast(device_type=decision.logits_TE.device.type, enabled=False):
            return RouterLossValues(
                self._balance_loss(decision, combine_weights_TK, token_mask_T, num_sequences, counting),
                router_z_loss(decision.logits_TE, token_mask_T),
            )

    def _balance_loss(self, decision, combine_weights_TK, token_mask_T, num_sequences: int, counting: bool):
        if self.scope == "sequence":
            return sequence_mean(self.balance_loss, decision, combine_weights_TK, token_mask_T, num_sequences)
        if self.scope == "global_batch" and self.training:
            if counting:
                self._add_to_global_batch(decision.top_k_index_TK, token_mask_T)
            fraction_E = self.global_assignments_per_expert / self.global_slots.clamp_min(1.0)
            return self.global_batch_loss(decision, combine_weights_TK, token_mask_T, fraction_E)
        return self.balance_loss(decision, combine_weights_TK, token_mask_T)

    @torch.no_grad()
    def _add_to_global_batch(self, top_k_index_TK: torch.Tensor, token_mask_T: torch.Tensor | None) -> None:
        assignments_E, slots = assignment_counts(top_k_index_TK, token_mask_T, self.num_experts)
        counts = torch.cat([assignments_E, slots.reshape(1)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        self.global_assignments_per_expert += counts[:-1]
        self.global_slots += counts[-1]

    def reset_global_batch(self) -> None:
        """Start the next optimizer step's global batch (a no-op for the other scopes)."""
        if self.scope == "global_batch":
            self.global_assignments_per_expert.zero_()
            self.global_slots.zero_()


class SparseMoeBlock(KeepsFloat32Buffers, nn.Module):
    """Router + dispatch + experts for one layer, replacing a dense feed-forward.

    Counters, owned by this block: added to in every forward (training and evaluation, padding tokens excluded;
    not while activation checkpointing recomputes a forward in backward), read and reset by `hf_moe`'s training
    callbacks after logging. They are non-persistent float32 buffers (never in a checkpoint, float32 whatever
    `.to(dtype)` does); every one is a sum (`COUNTER_REDUCTION`), so ranks combine them by summing. Under expert
    parallelism the router is replicated and each rank routes (and counts) only its own batch against global expert
    ids, so the counters stay full-size (E,) and the sum over the ranks that hold distinct batches is the global count.
    """

    # marks the module for `moe_parts` (found by this text, so copies loaded with trust_remote_code are found too)
    moe_part: ClassVar[str] = "block"
    COUNTER_REDUCTION = "sum"
    COUNTERS = (
        "routed_tokens_per_expert",  # (E,) (token, expert) assignments the router made
        "dropped_tokens_per_expert",  # (E,) of those, slots dropped by capacity
        "router_entropy_sum",  # () sum over tokens of the entropy of the routing distribution
        "num_tokens",  # () tokens routed (padding excluded)
        "kept_slots_sum",  # () (token, expert) slots the experts processed: experts per token = this / num_tokens
        "tokens_without_expert",  # () tokens no expert processed (all slots dropped or unused): the residual only
        "balanced_forwards",  # () forwards whose per-expert kept loads differ by at most 1 (BASE: every one)
        "balance_loss_sum",  # () sum over forwards of this layer's load-balancing loss
        "z_loss_sum",  # () sum over forwards of this layer's z-loss
        "num_forwards",  # () forwards counted
        # router diagnostics, counted only while `diagnostics` is on (see `_count_topk_margin`)
        "topk_margin_sum",  # () sum over tokens of the top-k boundary margin
        "topk_margin_histogram",  # (TOPK_MARGIN_BINS,) tokens per margin bin; summed over ranks, so percentiles merge
    )
    float32_buffers = COUNTERS
    # the margin histogram: bin 0 holds margins below TOPK_MARGIN_MIN (ties included), bins 1.. split
    # [TOPK_MARGIN_MIN, 1) into equal steps of log10 (6/63 decade, a factor 1.25); margins >= 1 (only a bias
    # makes them) go to the last bin
    TOPK_MARGIN_BINS: ClassVar[int] = 64
    TOPK_MARGIN_MIN: ClassVar[float] = 1e-6
    # gradient accumulation rarely runs this many micro-batches per step; more without a step means nobody steps
    FORWARDS_WITHOUT_STEP_WARNING: ClassVar[int] = 256

    def __init__(self, config, experts: nn.Module, shared_experts: nn.Module | None = None):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.router = build_router(config, experts.hidden_dim)
        self.experts = experts
        # always-active FFNs added to the routed output (`shared_experts.py`); None without
        self.shared_experts = shared_experts
        # Residual-MoE: per-token softmax weights of (the dense MLP, the routed expert); starts at (1/2, 1/2)
        self.residual_coefficient = nn.Linear(experts.hidden_dim, 2) if config.residual_moe else None
        # a router that bounds the expert loads itself (expert choice) gets no capacity on top
        self.capacity = Capacity(config, dropless=self.router.owns_capacity)
        self.losses = RouterLosses(config, learned=self.router.learned)
        # False while activation checkpointing recomputes this layer's forward (see `_compat._PauseCounting`)
        self.counting = True
        # training forwards since the last optimizer step, for the warning when no balancer ends the steps
        self.forwards_since_optimizer_step = 0
        # router diagnostics (the top-k margin counters): off unless asked for, so that plain training and inference
        # pay nothing; `hf_moe.training.LoadBalanceCallback` turns it on (`enable_router_diagnostics`)
        self.diagnostics = False
        for name in self.COUNTERS:
            shape = (self.num_experts,) if name.endswith("_per_expert") else ()
            shape = (self.TOPK_MARGIN_BINS,) if name.endswith("_histogram") else shape
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float32), persistent=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, S, D) or (T, D); `token_mask` and `input_ids` (B, S) or (T,), both optional."""
        if self._is_expert_parallel and self.experts.activation.expert_parallel_rank is None:
            # expert dropout draws from this rank's own stream (see `ExpertActivation`)
            self.experts.activation.expert_parallel_rank = torch.distributed.get_rank()
        hidden_dim = hidden_states.shape[-1]
        inputs = RoutingInputs(
            hidden_TD=hidden_states.reshape(-1, hidden_dim),
            num_sequences=hidden_states.shape[0] if hidden_states.dim() == 3 else 1,
            token_mask_T=None if token_mask is None else token_mask.reshape(-1),
            input_ids_T=None if input_ids is None else input_ids.reshape(-1),
        )
        decision = self.router(inputs)
        kept_TK = self.capacity.keep_mask(decision, inputs, self.training, self.router.leaves_slots_unused)
        weights_TK = decision.top_k_weights_TK if kept_TK is None else decision.top_k_weights_TK * kept_TK
        out_TD = run_experts(
            self.experts,
            inputs.hidden_TD,
            decision.top_k_index_TK,
            weights_TK.to(inputs.hidden_TD.dtype),
            kept_TK,
            always_call=self._is_expert_parallel,
        )
        if self.residual_coefficient is not None:
            coefficient_T2 = torch.softmax(self.residual_coefficient(inputs.hidden_TD).float(), dim=-1)
            coefficient_T2 = coefficient_T2.to(out_TD.dtype)
            out_TD = coefficient_T2[:, :1] * self.shared_experts(inputs.hidden_TD) + coefficient_T2[:, 1:] * out_TD
        elif self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(inputs.hidden_TD)
        losses = self.losses(decision, weights_TK, inputs.token_mask_T, inputs.num_sequences, self.counting)
        if self.counting:
            self._count(decision, kept_TK, inputs.token_mask_T, losses)
            if self.training and self.balances_per_optimizer_step:
                self._note_training_forward(decision, inputs.token_mask_T)
        return out_TD.view_as(hidden_states)

    @property
    def balances_per_optimizer_step(self) -> bool:
        """Whether this layer keeps balancing state that `hf_moe.training.RouterBalancer` must advance once per
        optimizer step: the expert bias (aux-loss-free balancing) or the global batch of the balance loss."""
        return getattr(self.router, "balances_with_bias", False) or self.losses.scope == "global_batch"

    def _note_training_forward(self, decision: RouterDecision, token_mask_T: torch.Tensor | None) -> None:
        if getattr(self.router, "balances_with_bias", False):
            self.router.add_expert_load(decision.top_k_index_TK, token_mask_T)
        if torch.compiler.is_compiling():
            return  # a Python counter would make the compiled graph guard on its value
        # bias balancing without a balancer never moves the bias: a setting that silently does nothing
        self.forwards_since_optimizer_step += 1
        if self.forwards_since_optimizer_step == self.FORWARDS_WITHOUT_STEP_WARNING:
            warnings.warn(
                f"this MoE model balances its routers once per optimizer step (router_bias_update_rate / "
                f"aux_loss_scope='global_batch'), but {self.FORWARDS_WITHOUT_STEP_WARNING} training forwards ran "
                "without a step: use hf_moe.MoeTrainer, add hf_moe.RouterBalancingCallback() to your Trainer, or call "
                "hf_moe.training.RouterBalancer(model).step() after each optimizer.step()",
                UserWarning,
                stacklevel=2,
            )

    def end_optimizer_step(self) -> None:
        """Called by `RouterBalancer` after it updated the bias: the next forward belongs to the next step."""
        self.losses.reset_global_batch()
        self.forwards_since_optimizer_step = 0

    @torch.no_grad()
    def _count(
        self,
        decision: RouterDecision,
        kept_TK: torch.Tensor | None,
        token_mask_T: torch.Tensor | None,
        losses: RouterLossValues,
    ) -> None:
        # every forward runs this, and at small shapes each tensor op costs microseconds: the common case (no padding
        # mask, nothing dropped) skips the ops whose result it knows (token weights 1, no drops, every token kept)
        top_k_index_TK = decision.top_k_index_TK
        num_tokens, top_k = top_k_index_TK.shape
        device = decision.logits_TE.device
        mask_T = None if token_mask_T is None else token_mask_T.to(device=device, dtype=torch.float32)
        # each slot's weight: 1, or 0 for a padding token's slots; kept: also 0 for a dropped slot
        if mask_T is None:
            routed_weights_N = torch.ones((), device=device).expand(num_tokens * top_k)
        else:
            routed_weights_N = mask_T.repeat_interleave(top_k)
        kept_weights_N = routed_weights_N if kept_TK is None else routed_weights_N * kept_TK.reshape(-1)
        # both loads in one scatter (row 0 routed, row 1 kept); unused slots (sentinel id E) go to an extra bin, cut off
        slot_weights_2N = torch.stack([routed_weights_N, kept_weights_N])
        loads_2X = torch.zeros(2, self.num_experts + 1, device=device)
        loads_2X.scatter_add_(1, top_k_index_TK.reshape(1, -1).expand(2, -1), slot_weights_2N)
        routed_load_E, kept_load_E = loads_2X[:, : self.num_experts]
        self.routed_tokens_per_expert += routed_load_E
        if kept_TK is not None:
            self.dropped_tokens_per_expert += routed_load_E - kept_load_E
        self.kept_slots_sum += kept_load_E.sum()
        if kept_TK is not None or self.router.leaves_slots_unused:  # else every token keeps its K >= 1 slots
            used_and_kept_TK = kept_weights_N.view(num_tokens, top_k) * (top_k_index_TK < self.num_experts)
            without_expert_T = (used_and_kept_TK.sum(dim=-1) == 0).float()
            self.tokens_without_expert += (without_expert_T if mask_T is None else without_expert_T * mask_T).sum()
        least_load, most_load = torch.aminmax(kept_load_E)
        self.balanced_forwards += (most_load - least_load <= 1).float()
        # of the distribution the routing used (temperature included); entr(0) = 0, so zero probabilities are fine
        entropy_TE = torch.special.entr(decision.routing_probs())
        self.router_entropy_sum += entropy_TE.sum() if mask_T is None else (entropy_TE.sum(dim=-1) * mask_T).sum()
        self.num_tokens += num_tokens if mask_T is None else mask_T.sum()
        self.balance_loss_sum += losses.balance_loss
        self.z_loss_sum += losses.z_loss
        self.num_forwards += 1
        if self.diagnostics:
            token_weights_T = torch.ones(num_tokens, device=device) if mask_T is None else mask_T
            self._count_topk_margin(decision, token_weights_T)

    def _count_topk_margin(self, decision: RouterDecision, token_weights_T: torch.Tensor) -> None:
        """Add each token's top-k boundary margin, the k-th minus the (k+1)-th largest selection score, to the margin
        counters (a small margin: a small change of the router flips the token's experts). The selection score is
        the routing probability, plus the expert bias when the router balances with one (what its top-k ranks).
        Only routers that rank a per-token score take a top-k of it (`supports_expert_bias`: token-choice top-k), and
        only with k < E; the others (expert choice, BASE, hash, the dense-to-sparse gate) count nothing."""
        router = self.router
        top_k = decision.top_k_index_TK.shape[-1]
        if not getattr(router, "supports_expert_bias", False) or top_k >= self.num_experts:
            return
        scores_TE = decision.routing_probs()
        if router.balances_with_bias:
            scores_TE = scores_TE + router.expert_bias
        boundary_T2 = torch.topk(scores_TE, top_k + 1, dim=-1).values[:, top_k - 1 :]
        margin_T = boundary_T2[:, 0] - boundary_T2[:, 1]
        self.topk_margin_sum += (margin_T * token_weights_T).sum()
        # fixed bins and scatter_add_: no host sync (bincount would read its length back), padding adds weight 0
        low = math.log10(self.TOPK_MARGIN_MIN)
        step = -low / (self.TOPK_MARGIN_BINS - 1)
        position_T = (torch.log10(margin_T.clamp_min(self.TOPK_MARGIN_MIN / 10)) - low) / step
        bin_T = (position_T.floor() + 1).clamp(0, self.TOPK_MARGIN_BINS - 1).long()
        self.topk_margin_histogram.scatter_add_(0, bin_T, token_weights_T)

    @property
    def _is_expert_parallel(self) -> bool:
        # set by transformers' expert-parallel sharding (`DistributedConfig(ep_size>1)`) on the experts module
        return getattr(self.experts, "_is_expert_parallel", False)

    def reset_counters(self) -> None:
        for name in self.COUNTERS:
            getattr(self, name).zero_()
