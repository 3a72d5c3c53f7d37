"""Routers: which experts each token goes to, with what weight, and which (token, expert) slots fit in capacity.

Shape legend: T tokens (batch x sequence, flattened), D hidden size, E experts, K experts per token,
N = T * K (token, expert) slots.

Routers are chosen by name (`config.router_type`) from `ROUTERS`. Every router computes in float32 whatever the
autocast dtype, because the softmax over experts and the z-loss are sensitive to precision (Switch, ST-MoE).

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .losses import importance_load_loss, noisy_top_k_load, router_z_loss, switch_load_balancing_loss

__all__ = [
    "ROUTERS",
    "NoisyTopKRouter",
    "Router",
    "RouterOutput",
    "TopKRouter",
    "build_router",
    "capacity_keep_mask",
    "expert_capacity",
]


class RouterOutput(NamedTuple):
    """What a router decides for one layer. A tuple, so transformers' `OutputRecorder(index=...)` can record fields.

    `kept_TK` is None in dropless mode; otherwise False marks a (token, expert) slot dropped by capacity.
    """

    logits_TE: torch.Tensor  # float32 logits the routing softmax used (training noise and temperature included)
    top_k_index_TK: torch.Tensor  # int64 expert ids
    top_k_weights_TK: torch.Tensor  # float32 combine weights (0 at dropped slots)
    kept_TK: torch.Tensor | None  # bool
    balance_loss: torch.Tensor  # float32 scalar, this layer's load-balancing loss
    z_loss: torch.Tensor  # float32 scalar, this layer's router z-loss


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert: ceil(factor * T * K / E), at least `min_capacity`, at most T (a token picks an expert once)."""
    capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    return min(max(capacity, min_capacity), num_tokens)


def capacity_keep_mask(
    top_k_index_TK: torch.Tensor,
    top_k_probs_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
    drop_policy: str = "position",
    token_mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which (token, expert) slots fit in each expert's capacity; returns kept_TK (bool).

    Priority among the slots of one expert: padding tokens last; then, for "position", all first choices before
    all second choices, each in token order (GShard); for "probability", the higher router probability first
    (batch prioritized routing, Riquelme et al. 2021). Sort-based: one sort of N keys, no (T, E, C) tensor, no
    host sync.
    """
    num_tokens, top_k = top_k_index_TK.shape
    num_slots = num_tokens * top_k
    device = top_k_index_TK.device
    # slot-major order (all first choices, then all second choices...) gives first choices priority
    expert_N = top_k_index_TK.t().reshape(-1)
    if drop_policy == "position":
        rank_N = torch.arange(num_slots, device=device)
    elif drop_policy == "probability":
        order_N = torch.argsort(top_k_probs_TK.t().reshape(-1), descending=True, stable=True)
        rank_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(num_slots, device=device))
    else:
        raise ValueError(f"drop_policy must be 'position' or 'probability', got {drop_policy!r}")
    if token_mask_T is None:
        is_padding_N = torch.zeros_like(expert_N)
    else:
        is_padding_N = (token_mask_T.reshape(-1) == 0).long().repeat(top_k)
    # one sort groups slots by expert and orders each group by priority
    sort_key_N = (expert_N * 2 + is_padding_N) * num_slots + rank_N
    perm_N = torch.argsort(sort_key_N)
    sorted_expert_N = expert_N[perm_N]
    slots_per_expert_E = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(
        0, expert_N, torch.ones_like(expert_N)
    )
    group_start_E = torch.cumsum(slots_per_expert_E, dim=0) - slots_per_expert_E
    position_in_expert_N = torch.arange(num_slots, device=device) - group_start_E[sorted_expert_N]
    kept_N = torch.empty(num_slots, dtype=torch.bool, device=device)
    kept_N[perm_N] = position_in_expert_N < capacity
    return kept_N.view(top_k, num_tokens).t()


class Router(nn.Module):
    """Token-choice top-k router (the base of every router here).

    k=1 with raw probabilities is Switch routing; k>=2 with renormalized weights is GShard / Mixtral routing.
    Subclasses change how the logits are perturbed (`perturb_logits`) and how the load is estimated.

    `temperature` and `top_k` are read in every forward, so a schedule may change them between steps: the routing
    softmax is softmax(logits / temperature), and `top_k` experts are chosen per token (the experts accept any K).
    """

    def __init__(self, config, hidden_size: int):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.normalize_top_k_weights = config.normalizes_top_k_weights
        self.unit_combine_weights = config.unit_combine_weights
        self.jitter_noise = config.router_jitter_noise
        self.logit_noise_std = config.router_logit_noise_std
        self.aux_loss_type = config.aux_loss_type
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.min_capacity = config.min_capacity
        self.drop_policy = config.drop_policy
        # A plain attribute, not a buffer: the dense-to-sparse schedule sets it on every rank alike, so it needs no
        # broadcast, no device moves and no checkpoint entry (the final value is saved as `config.router_temperature`).
        self.temperature = float(config.router_temperature)
        self.weight = nn.Parameter(torch.empty(self.num_experts, hidden_size))

    def perturb_logits(self, hidden_TD: torch.Tensor, logits_TE: torch.Tensor):
        """Training-time logit noise; returns (noisy logits, noise std per logit or None)."""
        if self.training and self.logit_noise_std > 0:
            return logits_TE + torch.randn_like(logits_TE) * self.logit_noise_std, None
        return logits_TE, None

    def forward(self, hidden_TD: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> RouterOutput:
        # float32 routing whatever the autocast dtype: the expert softmax and z-loss need the precision
        with torch.autocast(device_type=hidden_TD.device.type, enabled=False):
            hidden_TD = hidden_TD.float()
            if self.training and self.jitter_noise > 0:
                # Switch jitter: perturbs the router's input only, not the experts'
                jitter_TD = torch.empty_like(hidden_TD).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
                hidden_TD = hidden_TD * jitter_TD
            clean_logits_TE = F.linear(hidden_TD, self.weight.float())
            logits_TE, noise_std_TE = self.perturb_logits(hidden_TD, clean_logits_TE)
            # Temperature (dense-to-sparse gate, Nie et al. 2021) reshapes the softmax but not which experts win, so
            # the noisy load estimator keeps the untempered logits; the softmax, z-loss and reported logits use the
            # tempered ones. Skipped at 1.0 so the default path is unchanged.
            routing_logits_TE = logits_TE if self.temperature == 1.0 else logits_TE / self.temperature
            probs_TE = torch.softmax(routing_logits_TE, dim=-1)
            top_k_probs_TK, top_k_index_TK = torch.topk(probs_TE, self.top_k, dim=-1)
            top_k_weights_TK = top_k_probs_TK
            if self.unit_combine_weights:
                top_k_weights_TK = torch.ones_like(top_k_probs_TK)
            elif self.normalize_top_k_weights:
                top_k_weights_TK = top_k_probs_TK / top_k_probs_TK.sum(dim=-1, keepdim=True)

            kept_TK = None
            capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
            if capacity_factor is not None:
                capacity = expert_capacity(
                    hidden_TD.shape[0], self.num_experts, self.top_k, capacity_factor, self.min_capacity
                )
                kept_TK = capacity_keep_mask(
                    top_k_index_TK, top_k_probs_TK, self.num_experts, capacity, self.drop_policy, token_mask_T
                )
                top_k_weights_TK = top_k_weights_TK * kept_TK

            balance_loss = self.balance_loss(
                clean_logits_TE, logits_TE, noise_std_TE, probs_TE, top_k_index_TK, top_k_weights_TK, token_mask_T
            )
            z_loss = router_z_loss(routing_logits_TE, token_mask_T)
        return RouterOutput(routing_logits_TE, top_k_index_TK, top_k_weights_TK, kept_TK, balance_loss, z_loss)

    def balance_loss(
        self, clean_logits_TE, logits_TE, noise_std_TE, probs_TE, top_k_index_TK, top_k_weights_TK, token_mask_T
    ) -> torch.Tensor:
        if self.aux_loss_type == "switch":
            return switch_load_balancing_loss(probs_TE, top_k_index_TK, token_mask_T)
        # "cv_squared": importance + load (Shazeer et al. 2017)
        gates_TE = torch.zeros_like(probs_TE).scatter(1, top_k_index_TK, top_k_weights_TK)
        if noise_std_TE is not None:
            load_E = noisy_top_k_load(clean_logits_TE, logits_TE, noise_std_TE, self.top_k, token_mask_T)
        else:
            # hard counts carry no gradient: without noise only the importance term trains the router
            token_weights_TK = (
                torch.ones_like(top_k_weights_TK)
                if token_mask_T is None
                else token_mask_T.reshape(-1, 1).float().expand_as(top_k_weights_TK)
            )
            load_E = torch.zeros(self.num_experts, device=probs_TE.device).scatter_add_(
                0, top_k_index_TK.reshape(-1), token_weights_TK.reshape(-1)
            )
        return importance_load_loss(gates_TE, load_E, token_mask_T)


class TopKRouter(Router):
    """Top-k token choice with optional Switch jitter and additive Gaussian logit noise (`router_type="topk"`)."""


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, `router_type="noisy_topk"`).

    H(x) = x W_g + N(0, 1) * softplus(x W_noise) during training; the learned noise scale lets the router explore,
    and with `aux_loss_type="cv_squared"` the load term uses the paper's smooth, differentiable load estimator.
    """

    def __init__(self, config, hidden_size: int):
        super().__init__(config, hidden_size)
        self.noise_weight = nn.Parameter(torch.empty(self.num_experts, hidden_size))

    def perturb_logits(self, hidden_TD: torch.Tensor, logits_TE: torch.Tensor):
        if not self.training:
            return logits_TE, None
        # the small floor keeps the load estimator's division finite when softplus underflows
        noise_std_TE = F.softplus(F.linear(hidden_TD, self.noise_weight.float())) + 1e-2
        return logits_TE + torch.randn_like(logits_TE) * noise_std_TE, noise_std_TE


ROUTERS: dict[str, type[Router]] = {"topk": TopKRouter, "noisy_topk": NoisyTopKRouter}


def build_router(config, hidden_size: int) -> Router:
    """The router that `config.router_type` names."""
    if config.router_type not in ROUTERS:
        raise ValueError(f"router_type must be one of {tuple(ROUTERS)}, got {config.router_type!r}")
    return ROUTERS[config.router_type](config, hidden_size)
