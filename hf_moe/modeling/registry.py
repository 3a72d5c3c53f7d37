"""The one registry of routers and balance losses: the only place that lists their names.

Config validation, `parameter_counts()`, model cards and `hf-moe inspect` read it. Each entry declares what those
need to know without building a model: a router's extra parameters per MoE layer and its model-card label; a balance
loss's function and label. Adding a router is one class (`routing.Router`'s contract) and one line here, or one call
of `register_router` from user code:

```python
register_router("my_router", MyRouter, extra_parameters=lambda num_experts, hidden_size: num_experts * hidden_size,
                card_label="my router (Me et al. 2026)")
```

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings. A
router registered at run time is not in a saved folder's copy: such a folder loads only where it is registered again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from .losses import importance_load_balance_loss, switch_balance_loss, switch_global_batch_loss
from .routing import NoisyTopKRouter, Router, TopKRouter
from .routing_base import BaseLayerRouter
from .routing_dense_to_sparse import DenseToSparseRouter
from .routing_expert_choice import ExpertChoiceRouter
from .routing_hash import HashRouter

__all__ = [
    "BALANCE_LOSSES",
    "ROUTERS",
    "BalanceLossEntry",
    "Registry",
    "RouterEntry",
    "build_router",
    "register_balance_loss",
    "register_router",
]


@dataclass(frozen=True)
class RouterEntry:
    router_class: type[Router]
    # parameters one MoE layer's router adds, from (num_experts, hidden_size)
    extra_parameters: Callable[[int, int], int]
    card_label: str


@dataclass(frozen=True)
class BalanceLossEntry:
    # loss(decision, combine_weights_TK, token_mask_T) -> float32 scalar (see losses.py)
    loss: Callable[..., torch.Tensor]
    card_label: str
    # the same with the global batch's assignment fractions, loss(decision, combine_weights_TK, token_mask_T,
    # fraction_E), for losses built on f_e (`aux_loss_scope="global_batch"`); None: that scope is refused
    global_batch_loss: Callable[..., torch.Tensor] | None = None

    @property
    def scopes(self) -> tuple[str, ...]:
        """The `aux_loss_scope` values this loss supports (every loss runs per micro-batch and per sequence)."""
        return ("micro_batch", "sequence") + (("global_batch",) if self.global_batch_loss is not None else ())


EntryT = TypeVar("EntryT")


class Registry(dict, Generic[EntryT]):
    """Name -> entry for one config field; `entry(name)` raises the error that names the field and what is allowed."""

    def __init__(self, field: str):
        super().__init__()
        self.field = field

    def entry(self, name: str) -> EntryT:
        if name not in self:
            raise ValueError(f"{self.field} must be one of {tuple(self)}, got {name!r}")
        return self[name]


ROUTERS: Registry[RouterEntry] = Registry("router_type")
BALANCE_LOSSES: Registry[BalanceLossEntry] = Registry("aux_loss_type")


def register_router(
    name: str, router_class: type[Router], *, extra_parameters: Callable[[int, int], int], card_label: str
) -> None:
    """Make `router_type=name` build `router_class` (a `Router` subclass); replaces an entry of the same name."""
    if not (isinstance(router_class, type) and issubclass(router_class, Router)):
        raise TypeError(f"router_class must be a subclass of hf_moe's Router, got {router_class!r}")
    ROUTERS[name] = RouterEntry(router_class, extra_parameters, card_label)


def register_balance_loss(
    name: str,
    loss: Callable[..., torch.Tensor],
    *,
    card_label: str,
    global_batch_loss: Callable[..., torch.Tensor] | None = None,
) -> None:
    """Make `aux_loss_type=name` use `loss(decision, combine_weights_TK, token_mask_T)` (and, for
    `aux_loss_scope="global_batch"`, `global_batch_loss(decision, combine_weights_TK, token_mask_T, fraction_E)`).
    `aux_loss_scope="sequence"` runs `loss` on each sequence with `torch.vmap`: write it with out-of-place ops."""
    BALANCE_LOSSES[name] = BalanceLossEntry(loss, card_label, global_batch_loss)


def build_router(config, hidden_size: int) -> Router:
    """The router that `config.router_type` names."""
    return ROUTERS.entry(config.router_type).router_class(config, hidden_size)


register_router(
    "topk",
    TopKRouter,
    extra_parameters=lambda num_experts, hidden_size: num_experts * hidden_size,
    card_label="token-choice top-k softmax",
)
register_router(
    "noisy_topk",
    NoisyTopKRouter,
    extra_parameters=lambda num_experts, hidden_size: 2 * num_experts * hidden_size,
    card_label="noisy top-k gating (Shazeer et al. 2017)",
)
register_router(
    "dense_to_sparse",
    DenseToSparseRouter,
    extra_parameters=lambda num_experts, hidden_size: num_experts * hidden_size,
    card_label="dense-to-sparse Gumbel gate (Nie et al. 2021)",
)
register_router(
    "expert_choice",
    ExpertChoiceRouter,
    extra_parameters=lambda num_experts, hidden_size: num_experts * hidden_size,
    card_label="expert choice: each expert takes its top-C tokens (Zhou et al. 2022)",
)
register_router(
    "hash",
    HashRouter,
    extra_parameters=lambda num_experts, hidden_size: 0,
    card_label="hash layers: fixed token-id -> expert table (Roller et al. 2021)",
)
register_router(
    "base",
    BaseLayerRouter,
    extra_parameters=lambda num_experts, hidden_size: num_experts * hidden_size,
    card_label="BASE layers: balanced assignment (Lewis et al. 2021)",
)
register_balance_loss(
    "switch",
    switch_balance_loss,
    card_label="Switch load balancing (Fedus et al. 2021)",
    global_batch_loss=switch_global_batch_loss,
)
register_balance_loss(
    "cv_squared", importance_load_balance_loss, card_label="importance + load CV² (Shazeer et al. 2017)"
)
