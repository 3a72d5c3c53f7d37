"""The sparse MoE block: router + capacity + experts, and the routing counters the training callbacks read.

Shape legend: B batch, S sequence, T = B*S tokens, D hidden size, E experts, K experts per token,
N = T*K (token, expert) slots.

```
hidden (B,S,D) -> (T,D) -> router -> RouterOutput(logits_TE, top_k_index_TK, top_k_weights_TK, kept_TK, losses)
                        -> experts(hidden_TD, top_k_index_TK, top_k_weights_TK) -> (T,D) -> (B,S,D)
```
With capacity, only the kept slots reach the experts (a dropped slot costs no expert FLOPs and adds 0, so the
block's residual connection carries the token); finding them is the layer's one host sync.

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import torch
from torch import nn

from .routing import RouterOutput, build_router

__all__ = ["SparseMoeBlock", "require_non_reentrant_checkpointing"]


def _is_backward_recompute() -> bool:
    # Gradient checkpointing runs the forward a second time inside backward; counting it again would double every
    # counter. The autograd engine reports a graph task only while it executes a backward pass.
    return torch._C._current_graph_task_id() != -1


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


class SparseMoeBlock(nn.Module):
    """Router + experts for one layer, replacing a dense feed-forward.

    Counters, owned by this block: added to in every forward (training and evaluation, padding tokens excluded),
    read and reset by `hf_moe`'s training callbacks after logging. They are non-persistent buffers (never in a
    checkpoint); every one is a sum (`COUNTER_REDUCTION`), so ranks combine them by summing. Under expert parallelism
    the router is replicated and each rank routes (and counts) only its own batch against global expert ids, so the
    counters stay full-size (E,) and the sum over the ranks that hold distinct batches is the global count
    (`hf_moe.parallel.counter_reduce_group`).
    """

    COUNTER_REDUCTION = "sum"
    COUNTERS = (
        "routed_tokens_per_expert",  # (E,) (token, expert) assignments the router made
        "dropped_tokens_per_expert",  # (E,) of those, slots dropped by capacity
        "router_entropy_sum",  # () sum over tokens of the entropy of the routing distribution
        "num_tokens",  # () tokens routed (padding excluded)
        "balance_loss_sum",  # () sum over forwards of this layer's load-balancing loss
        "z_loss_sum",  # () sum over forwards of this layer's z-loss
        "num_forwards",  # () forwards counted
    )

    def __init__(self, config, experts: nn.Module):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.router = build_router(config, experts.hidden_dim)
        self.experts = experts
        for name in self.COUNTERS:
            shape = (self.num_experts,) if name.endswith("_per_expert") else ()
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float32), persistent=False)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self._is_expert_parallel and self.experts.act_fn.expert_parallel_rank is None:
            # expert dropout draws from this rank's own stream (see `ExpertActivation`)
            self.experts.act_fn.expert_parallel_rank = torch.distributed.get_rank()
        hidden_dim = hidden_states.shape[-1]
        hidden_TD = hidden_states.reshape(-1, hidden_dim)
        token_mask_T = None if token_mask is None else token_mask.reshape(-1)
        routing = self.router(hidden_TD, token_mask_T)
        weights_TK = routing.top_k_weights_TK.to(hidden_TD.dtype)
        if routing.kept_TK is None:
            out_TD = self.experts(hidden_TD, routing.top_k_index_TK, weights_TK)
        else:
            out_TD = self._experts_on_kept_slots(hidden_TD, routing.top_k_index_TK, weights_TK, routing.kept_TK)
        if not _is_backward_recompute():
            self._count(routing, token_mask_T)
        return out_TD.view_as(hidden_states)

    def _experts_on_kept_slots(
        self,
        hidden_TD: torch.Tensor,
        top_k_index_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        kept_TK: torch.Tensor,
    ) -> torch.Tensor:
        """Run the experts on the kept (token, expert) slots only, as top-1 rows, and sum them back per token."""
        num_tokens, top_k = top_k_index_TK.shape
        kept_slots_N = kept_TK.reshape(-1).nonzero().squeeze(-1)  # the layer's one host sync
        out_ND = hidden_TD.new_zeros(num_tokens * top_k, hidden_TD.shape[-1])
        # under expert parallelism the experts' all-to-all is a collective: every rank joins it, kept slots or not
        if kept_slots_N.numel() > 0 or self._is_expert_parallel:
            out_kept = self.experts(
                hidden_TD[kept_slots_N // top_k],
                top_k_index_TK.reshape(-1, 1)[kept_slots_N],
                weights_TK.reshape(-1, 1)[kept_slots_N],
            )
            out_ND = out_ND.index_put((kept_slots_N,), out_kept.to(out_ND.dtype))
        # reshape + sum rather than index_add_: deterministic on GPU
        return out_ND.view(num_tokens, top_k, -1).sum(dim=1)

    @torch.no_grad()
    def _count(self, routing: RouterOutput, token_mask_T: torch.Tensor | None) -> None:
        num_tokens, top_k = routing.top_k_index_TK.shape
        if token_mask_T is None:
            token_weights_T = torch.ones(num_tokens, device=routing.logits_TE.device)
        else:
            token_weights_T = token_mask_T.to(device=routing.logits_TE.device, dtype=torch.float32)
        slot_weights_N = token_weights_T.repeat_interleave(top_k)
        expert_N = routing.top_k_index_TK.reshape(-1)
        self.routed_tokens_per_expert.scatter_add_(0, expert_N, slot_weights_N)
        if routing.kept_TK is not None:
            dropped_N = (~routing.kept_TK.reshape(-1)).float() * slot_weights_N
            self.dropped_tokens_per_expert.scatter_add_(0, expert_N, dropped_N)
        log_probs_TE = torch.log_softmax(routing.logits_TE, dim=-1)
        entropy_T = -(log_probs_TE.exp() * log_probs_TE).sum(dim=-1)
        self.router_entropy_sum += (entropy_T * token_weights_T).sum()
        self.num_tokens += token_weights_T.sum()
        self.balance_loss_sum += routing.balance_loss.detach()
        self.z_loss_sum += routing.z_loss.detach()
        self.num_forwards += 1

    @property
    def _is_expert_parallel(self) -> bool:
        # set by transformers' expert-parallel sharding (`DistributedConfig(ep_size>1)`) on the experts module
        return getattr(self.experts, "_is_expert_parallel", False)

    def reset_counters(self) -> None:
        for name in self.COUNTERS:
            getattr(self, name).zero_()
