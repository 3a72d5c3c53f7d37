"""Dispatch: which (token, expert) slots fit in each expert's capacity, and running the experts on the kept slots.

Shape legend: T tokens (B sequences of S, flattened row by row), D hidden size, E experts, K expert slots per token,
N = T * K slots, C capacity (slots per expert per scope unit).

Capacity (all `None`: dropless, the default):
- `capacity_factor` / `eval_capacity_factor`: C = ceil(factor * tokens * K / E), at least `min_capacity`, at most the
  tokens of the unit; or `expert_capacity`: a fixed C in training and evaluation alike (Switch Transformers' field).
- `capacity_scope`: the unit C applies to. "batch" pools every token of the forward (GShard's group of one batch);
  "sequence" gives each expert C slots in every sequence (Switch's per-sequence capacity: a long sequence cannot take
  a short one's slots, and the result does not depend on what else is in the batch).
- `drop_policy`: which slots win when an expert overflows: "position" (all first choices before all second choices,
  each in token order; GShard) or "probability" (the most confident first; batch prioritized routing, Riquelme et
  al. 2021). Padding tokens always come last, so they never take a real token's slot.

A dropped slot costs no expert FLOPs and contributes 0 (the block's residual carries the token). So do the unused
slots (sentinel id E) of routers with a variable number of experts per token.

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .routing import RouterDecision, RoutingInputs, sequence_ids

__all__ = ["CAPACITY_SCOPES", "DROP_POLICIES", "Capacity", "capacity_keep_mask", "expert_capacity", "run_experts"]

CAPACITY_SCOPES = ("batch", "sequence")
DROP_POLICIES = ("position", "probability")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert: ceil(factor * T * K / E), at least `min_capacity`, at most T (a token picks an expert once)."""
    capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    return min(max(capacity, min_capacity), num_tokens)


def capacity_keep_mask(
    top_k_index_TK: torch.Tensor,
    priority_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
    drop_policy: str = "position",
    token_mask_T: torch.Tensor | None = None,
    num_sequences: int = 1,
) -> torch.Tensor:
    """Which (token, expert) slots fit in capacity; returns kept_TK (bool). Unused slots (id E) are never kept.

    `priority_TK` orders the slots of one expert for "probability" (higher first; typically the router probability).
    With `num_sequences` B > 1 every sequence of T // B tokens has its own `capacity` per expert ("sequence" scope).
    Sort-based: one sort of N keys, no (T, E, C) tensor, no host sync.
    """
    num_tokens, top_k = top_k_index_TK.shape
    num_slots = num_tokens * top_k
    device = top_k_index_TK.device
    # slot-major order (all first choices, then all second choices...) gives first choices priority
    expert_N = top_k_index_TK.t().reshape(-1)
    if drop_policy == "position":
        rank_N = torch.arange(num_slots, device=device)
    elif drop_policy == "probability":
        order_N = torch.argsort(priority_TK.t().reshape(-1), descending=True, stable=True)
        rank_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(num_slots, device=device))
    else:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    if token_mask_T is None:
        is_padding_N = torch.zeros_like(expert_N)
    else:
        is_padding_N = (token_mask_T.reshape(-1) == 0).long().repeat(top_k)
    # a capacity group is one (sequence, expert) pair; the sentinel id E makes a group of its own that keeps nothing
    groups_per_sequence = num_experts + 1
    group_N = expert_N
    if num_sequences > 1:
        sequence_N = sequence_ids(num_tokens, num_sequences, device).repeat(top_k)
        group_N = sequence_N * groups_per_sequence + expert_N
    num_groups = num_sequences * groups_per_sequence
    # one sort groups slots by capacity group and orders each group by priority
    sort_key_N = (group_N * 2 + is_padding_N) * num_slots + rank_N
    perm_N = torch.argsort(sort_key_N)
    sorted_group_N = group_N[perm_N]
    slots_per_group_G = torch.zeros(num_groups, dtype=torch.long, device=device).scatter_add_(
        0, group_N, torch.ones_like(group_N)
    )
    group_start_G = torch.cumsum(slots_per_group_G, dim=0) - slots_per_group_G
    position_in_group_N = torch.arange(num_slots, device=device) - group_start_G[sorted_group_N]
    kept_N = torch.empty(num_slots, dtype=torch.bool, device=device)
    kept_N[perm_N] = (position_in_group_N < capacity) & (expert_N[perm_N] < num_experts)
    return kept_N.view(top_k, num_tokens).t()


class Capacity:
    """The capacity settings of one MoE layer (read from the config once) and the keep mask of each forward."""

    def __init__(self, config, dropless: bool = False):
        """`dropless=True` ignores the config's capacity fields (a router that bounds expert loads itself reads them)."""
        self.num_experts = config.num_local_experts
        self.train_factor = None if dropless else config.capacity_factor
        self.eval_factor = None if dropless else config.eval_capacity_factor
        self.fixed = None if dropless else config.expert_capacity
        self.min_capacity = config.min_capacity
        self.drop_policy = config.drop_policy
        self.scope = config.capacity_scope

    def is_dropless(self, training: bool) -> bool:
        return self.fixed is None and (self.train_factor if training else self.eval_factor) is None

    def slots_per_expert(self, tokens_per_unit: int, top_k: int, training: bool) -> int:
        if self.fixed is not None:
            return self.fixed
        factor = self.train_factor if training else self.eval_factor
        return expert_capacity(tokens_per_unit, self.num_experts, top_k, factor, self.min_capacity)

    def keep_mask(
        self, decision: RouterDecision, inputs: RoutingInputs, training: bool, leaves_slots_unused: bool
    ) -> torch.Tensor | None:
        """kept_TK (bool), or None when every slot reaches the experts (dropless, no unused slots)."""
        index_TK = decision.top_k_index_TK
        if self.is_dropless(training):
            return index_TK < self.num_experts if leaves_slots_unused else None
        num_sequences = inputs.num_sequences if self.scope == "sequence" else 1
        num_tokens, top_k = index_TK.shape
        capacity = self.slots_per_expert(num_tokens // num_sequences, top_k, training)
        priority_TK = None
        if self.drop_policy == "probability":
            # the router probability of each chosen expert (not the combine weight, which may be renormalized)
            priority_TK = decision.routing_probs().gather(1, index_TK.clamp(max=self.num_experts - 1))
        return capacity_keep_mask(
            index_TK, priority_TK, self.num_experts, capacity, self.drop_policy, inputs.token_mask_T, num_sequences
        )


def run_experts(
    experts: nn.Module,
    hidden_TD: torch.Tensor,
    top_k_index_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    kept_TK: torch.Tensor | None,
    always_call: bool = False,
) -> torch.Tensor:
    """out_TD = sum over kept slots of weight * expert(hidden). Without a keep mask, transformers' experts contract
    directly; with one, only the kept slots reach the experts (as top-1 rows), so dropped slots cost no FLOPs.

    `always_call`: call the experts even when no slot is kept (under expert parallelism their all-to-all is a
    collective that every rank must join).
    """
    if kept_TK is None:
        return experts(hidden_TD, top_k_index_TK, weights_TK)
    num_tokens, top_k = top_k_index_TK.shape
    kept_slots_N = kept_TK.reshape(-1).nonzero().squeeze(-1)  # the layer's one host sync
    out_ND = hidden_TD.new_zeros(num_tokens * top_k, hidden_TD.shape[-1])
    if kept_slots_N.numel() > 0 or always_call:
        # index_select / index_copy rather than advanced indexing: their backwards are a row scatter-add and a row
        # gather, where advanced indexing's is an accumulating `index_put_` (slow on CPU; see `experts_auto.py`)
        out_kept = experts(
            hidden_TD.index_select(0, kept_slots_N // top_k),
            top_k_index_TK.reshape(-1, 1).index_select(0, kept_slots_N),
            weights_TK.reshape(-1, 1).index_select(0, kept_slots_N),
        )
        out_ND = out_ND.index_copy(0, kept_slots_N, out_kept.to(out_ND.dtype))  # each slot once
    # reshape + sum rather than index_add_: deterministic on GPU
    return out_ND.view(num_tokens, top_k, -1).sum(dim=1)
