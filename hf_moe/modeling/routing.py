"""Routers: which experts each token goes to, and with what weight. Nothing else (no capacity, no losses).

Shape legend: T tokens (batch x sequence, flattened row by row), D hidden size, E experts, K expert slots per token.

The contract every router keeps (chosen by name, `config.router_type`, from `registry.ROUTERS`):

```
RoutingInputs(hidden_TD, num_sequences, token_mask_T, input_ids_T)  ->  router  ->  RouterDecision(
    logits_TE        float32 router logits, training noise included, temperature not (the z-loss keeps these small),
    top_k_index_TK   int64 expert ids; a slot a router leaves unused holds the sentinel id E,
    top_k_weights_TK float32 combine weights; 0 at unused slots,
    probs_TE         the routing softmax (temperature included), when the router computed one (the losses, the
                     metrics and "probability" drops use it; without it they take softmax(logits_TE)),
    noise            what a load estimator needs from noisy gating, or None)
```
A router whose tokens may use fewer than K experts (0..E experts per token) sets `leaves_slots_unused = True`; the
block then hands only the used slots to the experts. Capacity (`dispatch.py`) and the losses (`losses.py`) are the
block's business, computed from the decision.

Routers compute in float32 whatever the autocast dtype, because the softmax over experts and the z-loss are sensitive
to precision (Switch, ST-MoE).

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ._compat import KeepsFloat32Buffers

__all__ = [
    "TOKEN_CHOICE_SETTINGS",
    "NoisyTopKRouter",
    "Router",
    "RouterDecision",
    "RouterNoise",
    "RoutingInputs",
    "TopKRouter",
    "refuse_settings",
    "sequence_ids",
]


# The token-choice settings (`TopKRouter`'s noise, temperature and combine-weight options) with the values that leave
# them off; routers that ignore them refuse other values (`refuse_settings`): a setting that does nothing is a bug
TOKEN_CHOICE_SETTINGS = {
    "router_jitter_noise": (0,),
    "router_logit_noise_std": (0,),
    "router_temperature": (1,),
    "unit_combine_weights": (False,),
    "normalize_top_k_weights": (None, False),
}


def refuse_settings(config, router_type: str, why: str, off_values: dict[str, tuple] = TOKEN_CHOICE_SETTINGS) -> None:
    """For a router's `validate_config`: raise `ValueError` naming the first field in `off_values` that `config` sets
    to something else, since `router_type` ignores it (`why` says why)."""
    for name, allowed in off_values.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ValueError(
                f"router_type={router_type!r} does not use {name} ({why}), got {value!r}; leave it at its default"
            )


def sequence_ids(num_tokens: int, num_sequences: int, device: torch.device) -> torch.Tensor:
    """The sequence each of `num_tokens` row-major tokens belongs to, (T,) int64: [0, 0, ..., 1, 1, ...]."""
    return torch.arange(num_sequences, device=device).repeat_interleave(num_tokens // num_sequences)


class RoutingInputs(NamedTuple):
    """Everything a router (and the dispatch, and the losses) may need about the tokens of one MoE layer."""

    hidden_TD: torch.Tensor  # the layer's input, flattened
    num_sequences: int = 1  # B: the T tokens are B sequences of T // B, row by row
    token_mask_T: torch.Tensor | None = None  # 1 for tokens that count, 0 for padding; None: all count
    input_ids_T: torch.Tensor | None = None  # the tokens' ids (only the new tokens' during cached generation)

    @property
    def sequence_ids_T(self) -> torch.Tensor:
        """The sequence (batch row) each token belongs to, (T,) int64."""
        return sequence_ids(self.hidden_TD.shape[0], self.num_sequences, self.hidden_TD.device)


class RouterNoise(NamedTuple):
    """What noisy top-k gating's smooth load estimator needs (Shazeer et al. 2017, appendix A); untempered logits."""

    clean_logits_TE: torch.Tensor
    noisy_logits_TE: torch.Tensor
    noise_std_TE: torch.Tensor


class RouterDecision(NamedTuple):
    """What a router decides for one layer. A tuple, so transformers' `OutputRecorder(index=0)` records the logits."""

    logits_TE: torch.Tensor
    top_k_index_TK: torch.Tensor
    top_k_weights_TK: torch.Tensor
    probs_TE: torch.Tensor | None = None
    noise: RouterNoise | None = None

    def routing_probs(self) -> torch.Tensor:
        """The routing distribution in float32: the router's own softmax, else softmax(logits_TE)."""
        return self.probs_TE if self.probs_TE is not None else torch.softmax(self.logits_TE.float(), dim=-1)


class Router(nn.Module):
    """The base of every router: `forward(RoutingInputs) -> RouterDecision`.

    `top_k` is read in every forward, so a schedule may change it between steps (the experts accept any K).
    """

    # marks the module for `moe_parts` (found by this text, so copies loaded with trust_remote_code are found too)
    moe_part: ClassVar[str] = "router"
    # True for routers whose decisions may hold unused slots (sentinel id E, weight 0): the block drops them
    leaves_slots_unused: ClassVar[bool] = False
    # True for routers that bound every expert's load themselves (expert choice): the block adds no capacity on top
    owns_capacity: ClassVar[bool] = False
    # False for routers with nothing to learn (hash): the block then computes no router losses (they would only add
    # a constant to the model's loss)
    learned: ClassVar[bool] = True
    # `router_aux_loss_coef` when the config leaves it None; 0 for routers balanced by construction or by design
    default_aux_loss_coef: ClassVar[float] = 0.01
    # True for routers that select experts by a score a per-expert bias can shift (aux-loss-free balancing,
    # `router_bias_update_rate`); the others refuse that setting
    supports_expert_bias: ClassVar[bool] = False

    def __init__(self, config, hidden_size: int):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.hidden_size = hidden_size

    def forward(self, inputs: RoutingInputs) -> RouterDecision:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(inputs) -> RouterDecision")

    @classmethod
    def validate_config(cls, config) -> None:
        """Raise `ValueError` (naming the field and what is allowed) for config values this router cannot use; the
        config's validation calls it, so a bad combination fails when the config is built, before any weights."""

    @classmethod
    def settings(cls, config) -> dict[str, str]:
        """This router's own config settings, label -> value, for model cards and `hf-moe inspect`."""
        return {}

    @classmethod
    def experts_per_token(cls, config) -> float:
        """Experts one token uses (at most, or on average for expert choice): `parameter_counts()["active"]`."""
        return config.num_experts_per_tok

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """`weight` ~ N(0, std^2), small so routing starts near uniform; every other parameter 0 (e.g. a learned noise
        scale starts with no preference, as in Shazeer et al.). Routers with other needs override this."""
        for name, param in self.named_parameters(recurse=False):
            if name == "weight":
                init.normal_(param, mean=0.0, std=std, generator=generator)
            else:
                init.zeros_(param)


class TopKRouter(KeepsFloat32Buffers, Router):
    """Token-choice top-k softmax routing (`router_type="topk"`).

    k=1 with raw probabilities is Switch routing; k>=2 with renormalized weights is GShard / Mixtral routing.
    Training-time noise: Switch's multiplicative jitter on the router input (`router_jitter_noise`) and additive
    Gaussian logit noise (`router_logit_noise_std`). The routing softmax is softmax(logits / temperature); the
    dense-to-sparse schedule anneals `temperature` between steps.

    Aux-loss-free balancing (Wang et al. 2024, DeepSeek-V3), on when `router_bias_update_rate > 0`: the experts are
    selected by probs + `expert_bias`, the combine weights still come from the unbiased probs (the bias steers the
    load, not the output). Who owns what: `expert_bias` (E,) is a persistent float32 buffer (checkpointed, resumed,
    saved to the Hub; float32 whatever `.to(dtype)` does, since steps of 1e-3 vanish in bfloat16), changed only by
    `update_expert_bias` once per optimizer step (`hf_moe.training.RouterBalancer`). `expert_load` (E,) is a
    non-persistent float32 buffer: the block adds its selections to it in training forwards, the balancer drains it.
    """

    supports_expert_bias = True
    float32_buffers = ("expert_bias", "expert_load")

    def __init__(self, config, hidden_size: int):
        super().__init__(config, hidden_size)
        self.bias_update_rate = float(config.router_bias_update_rate)
        if self.balances_with_bias:
            self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32), persistent=True)
            self.register_buffer("expert_load", torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)
        self.normalize_top_k_weights = config.normalizes_top_k_weights
        self.unit_combine_weights = config.unit_combine_weights
        self.jitter_noise = config.router_jitter_noise
        self.logit_noise_std = config.router_logit_noise_std
        # A plain attribute, not a buffer: the dense-to-sparse schedule sets it on every rank alike, so it needs no
        # broadcast, no device moves and no checkpoint entry (the final value is saved as `config.router_temperature`).
        self.temperature = float(config.router_temperature)
        self.weight = nn.Parameter(torch.empty(self.num_experts, hidden_size))

    def perturb_logits(
        self, hidden_TD: torch.Tensor, logits_TE: torch.Tensor
    ) -> tuple[torch.Tensor, RouterNoise | None]:
        """Training-time logit noise; returns the noisy logits and, for learned noise, what its load estimator needs."""
        if self.training and self.logit_noise_std > 0:
            return logits_TE + torch.randn_like(logits_TE) * self.logit_noise_std, None
        return logits_TE, None

    def forward(self, inputs: RoutingInputs) -> RouterDecision:
        hidden_TD = inputs.hidden_TD
        # float32 routing whatever the autocast dtype: the expert softmax and z-loss need the precision
        with torch.autocast(device_type=hidden_TD.device.type, enabled=False):
            hidden_TD = hidden_TD.float()
            if self.training and self.jitter_noise > 0:
                # Switch jitter: perturbs the router's input only, not the experts'
                jitter_TD = torch.empty_like(hidden_TD).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
                hidden_TD = hidden_TD * jitter_TD
            logits_TE, noise = self.perturb_logits(hidden_TD, F.linear(hidden_TD, self.weight.float()))
            # Temperature (dense-to-sparse schedule) reshapes the softmax but not which experts win; skipped at 1.0 so
            # the default path does no extra work. `logits_TE` stays untempered: a z-loss on logits / 0.02 would be
            # 2500x larger and fight the annealing
            probs_TE = torch.softmax(logits_TE if self.temperature == 1.0 else logits_TE / self.temperature, dim=-1)
            if self.balances_with_bias:
                # the bias picks the experts; the weights are the unbiased probabilities of the picked experts
                top_k_index_TK = torch.topk(probs_TE + self.expert_bias, self.top_k, dim=-1).indices
                top_k_probs_TK = probs_TE.gather(-1, top_k_index_TK)
            else:
                top_k_probs_TK, top_k_index_TK = torch.topk(probs_TE, self.top_k, dim=-1)
            if self.unit_combine_weights:
                top_k_weights_TK = torch.ones_like(top_k_probs_TK)
            elif self.normalize_top_k_weights:
                top_k_weights_TK = top_k_probs_TK / top_k_probs_TK.sum(dim=-1, keepdim=True)
            else:
                top_k_weights_TK = top_k_probs_TK
        return RouterDecision(logits_TE, top_k_index_TK, top_k_weights_TK, probs_TE, noise)

    @property
    def balances_with_bias(self) -> bool:
        """Whether this router selects experts with an expert bias (aux-loss-free balancing)."""
        return self.bias_update_rate > 0

    @torch.no_grad()
    def add_expert_load(self, top_k_index_TK: torch.Tensor, token_mask_T: torch.Tensor | None) -> None:
        """Add one training forward's selections to `expert_load` (padding tokens add 0; no host sync)."""
        weights_N = torch.ones(top_k_index_TK.numel(), device=top_k_index_TK.device)
        if token_mask_T is not None:
            weights_N = token_mask_T.to(weights_N).repeat_interleave(top_k_index_TK.shape[-1])
        self.expert_load.scatter_add_(0, top_k_index_TK.reshape(-1), weights_N)

    @torch.no_grad()
    def update_expert_bias(self, load_E: torch.Tensor) -> None:
        """One aux-loss-free balancing step: bias_e += rate * sign(mean load - load_e), so overloaded experts get
        picked less and underloaded ones more. `load_E` is the step's selections over every micro-batch and rank."""
        load_E = load_E.to(self.expert_bias)
        self.expert_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        super().init_weights(std, generator)
        if self.balances_with_bias:
            # no-ops for a bias loaded from a checkpoint (transformers' `init` functions skip loaded tensors)
            init.zeros_(self.expert_bias)
            init.zeros_(self.expert_load)


class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al. 2017, `router_type="noisy_topk"`).

    H(x) = x W_g + N(0, 1) * softplus(x W_noise) during training; the learned noise scale lets the router explore,
    and with `aux_loss_type="cv_squared"` the load term uses the paper's smooth, differentiable load estimator.
    """

    def __init__(self, config, hidden_size: int):
        super().__init__(config, hidden_size)
        self.noise_weight = nn.Parameter(torch.empty(self.num_experts, hidden_size))

    def perturb_logits(
        self, hidden_TD: torch.Tensor, logits_TE: torch.Tensor
    ) -> tuple[torch.Tensor, RouterNoise | None]:
        if not self.training:
            return logits_TE, None
        # the small floor keeps the load estimator's division finite when softplus underflows
        noise_std_TE = F.softplus(F.linear(hidden_TD, self.noise_weight.float())) + 1e-2
        noisy_logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        return noisy_logits_TE, RouterNoise(logits_TE, noisy_logits_TE, noise_std_TE)
