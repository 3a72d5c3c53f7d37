"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", arXiv 2202.09368).

Shape legend: T tokens (B sequences of S, flattened row by row), D hidden size, E experts, K = E expert slots per token,
U capacity units (1 for `capacity_scope="batch"`, B for "sequence"), L = T // U tokens per unit, C capacity (tokens
each expert takes per unit).

Token choice lets every token pick its experts and then drops what overflows an expert's capacity. Expert choice turns
the selection around: every expert picks the C tokens it has the highest affinity with, so each expert processes
exactly C tokens (balanced by construction: no balancing loss needed, nothing dropped) and a token gets 0..E experts.

```
S_TE = softmax(h_TD W_ED^T) over experts (float32)        token-to-expert affinities
per unit, per expert e: the top-C tokens by S[:, e]       topk along the token dim (padding is never chosen)
top_k_index_TK[t, e] = e if e chose t, else E (unused)    K = E slots, slot e is expert e
top_k_weights_TK[t, e] = S[t, e] if e chose t, else 0     the paper's gating weights G
```
C = ceil(c * L / E) (`dispatch.expert_capacity` with top_k 1), at least `min_capacity`, at most L, with the paper's
capacity factor c = `capacity_factor` in training and `eval_capacity_factor` (None: `capacity_factor`) at evaluation;
or the fixed `expert_capacity` (at most L). c is the average number of experts per token (the paper's c = 2 matches
top-2 token choice's compute). A token no expert chose gets 0 from the block: the residual connection carries it.

Causality: an expert picks its tokens among all the tokens of the unit, so a token's output depends on the other
tokens' affinities, later tokens and (in "batch" scope) other sequences included. In an encoder that is harmless. In a
causal decoder it leaks the future during training, and generation differs from training: during cached generation
each step routes only its new tokens (T = B at a decoding step), so every expert chooses among the B new tokens of the
step (C from that T: with the default `min_capacity` 4 and B <= 4, or in "sequence" scope where L = 1, every expert
takes every new token). `validate_config` therefore refuses MoE layers in a causal stack unless
`allow_noncausal_routing=True`.

The token-choice knobs (`router_jitter_noise`, `router_logit_noise_std`, `router_temperature`,
`unit_combine_weights`, `normalize_top_k_weights`) are refused rather than ignored; `drop_policy` does not apply
(an expert's choice is by affinity by definition, and the block adds no capacity on top: `owns_capacity`).

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import expert_capacity
from .routing import Router, RouterDecision, RoutingInputs, refuse_settings

__all__ = ["ExpertChoiceRouter"]


class ExpertChoiceRouter(Router):
    """Expert-choice routing (`router_type="expert_choice"`): each expert takes its top-C tokens by affinity.

    Needs a capacity (`capacity_factor` or `expert_capacity`); `capacity_scope` says whether the experts choose among
    all the tokens of a forward ("batch") or within each sequence ("sequence"). Not causal: see the module docstring.
    """

    leaves_slots_unused: ClassVar[bool] = True
    owns_capacity: ClassVar[bool] = True
    # every expert processes exactly C tokens: balanced by construction
    default_aux_loss_coef: ClassVar[float] = 0.0

    def __init__(self, config, hidden_size: int):
        super().__init__(config, hidden_size)
        self.train_factor = config.capacity_factor
        # evaluation falls back to the training factor: expert choice has no dropless mode to fall back to
        self.eval_factor = (
            config.eval_capacity_factor if config.eval_capacity_factor is not None else self.train_factor
        )
        self.fixed_capacity = config.expert_capacity
        self.min_capacity = config.min_capacity
        self.per_sequence = config.capacity_scope == "sequence"
        self.weight = nn.Parameter(torch.empty(self.num_experts, hidden_size))

    def capacity(self, tokens_per_unit: int, training: bool) -> int:
        """C: the tokens each expert takes in a unit of `tokens_per_unit` tokens (never more than the unit holds)."""
        if self.fixed_capacity is not None:
            return min(self.fixed_capacity, tokens_per_unit)
        factor = self.train_factor if training else self.eval_factor
        return expert_capacity(tokens_per_unit, self.num_experts, 1, factor, self.min_capacity)

    def forward(self, inputs: RoutingInputs) -> RouterDecision:
        hidden_TD = inputs.hidden_TD
        num_tokens = hidden_TD.shape[0]
        num_units = inputs.num_sequences if self.per_sequence else 1
        tokens_per_unit = num_tokens // num_units
        # a Python int from shapes: topk along the token dim needs no host sync
        capacity = self.capacity(tokens_per_unit, self.training)
        # float32 routing whatever the autocast dtype, like every router
        with torch.autocast(device_type=hidden_TD.device.type, enabled=False):
            logits_TE = F.linear(hidden_TD.float(), self.weight.float())
            probs_TE = torch.softmax(logits_TE, dim=-1)
            with torch.no_grad():
                # affinities are >= 0, so -1 puts padding below every real token; a unit with fewer real tokens than C
                # still picks some padding, which the token mask then removes (those choices stay unused)
                scores_TE = probs_TE
                if inputs.token_mask_T is not None:
                    is_real_T = inputs.token_mask_T.to(probs_TE.device) != 0
                    scores_TE = torch.where(is_real_T.unsqueeze(-1), probs_TE, -1.0)
                scores_UEL = scores_TE.view(num_units, tokens_per_unit, self.num_experts).transpose(1, 2)
                chosen_index_UEC = torch.topk(scores_UEL, capacity, dim=-1).indices
                chosen_UEL = torch.zeros_like(scores_UEL, dtype=torch.bool).scatter_(-1, chosen_index_UEC, True)
                chosen_TE = chosen_UEL.transpose(1, 2).reshape(num_tokens, self.num_experts)
                if inputs.token_mask_T is not None:
                    chosen_TE = chosen_TE & is_real_T.unsqueeze(-1)
            # K = E slots: slot e is expert e when it chose the token, else the sentinel id E
            expert_ids_E = torch.arange(self.num_experts, device=probs_TE.device)
            top_k_index_TK = torch.where(chosen_TE, expert_ids_E, self.num_experts)
            top_k_weights_TK = probs_TE * chosen_TE
        return RouterDecision(logits_TE, top_k_index_TK, top_k_weights_TK, probs_TE)

    @classmethod
    def validate_config(cls, config) -> None:
        if config.capacity_factor is None and config.expert_capacity is None:
            raise ValueError(
                "router_type='expert_choice' needs a capacity: each expert takes C = capacity_factor * tokens / "
                "experts tokens, where capacity_factor is the paper's c, the average number of experts per token "
                "(e.g. 2.0, the compute of top-2 token choice). Set capacity_factor (and optionally "
                "eval_capacity_factor), or a fixed expert_capacity."
            )
        # unknown families count as causal: opting in is cheap, a silent leak of the future is not
        if getattr(config, "has_causal_moe_layers", True) and not config.allow_noncausal_routing:
            raise ValueError(
                "router_type='expert_choice' is not causal: each expert picks its tokens among the whole batch, so a "
                "token's output depends on later tokens and on other sequences. In a causal LM that leaks the future "
                "during training and makes generation differ from training. For T5 put MoE layers only in the "
                "encoder (decoder_moe_layers=[]); or accept the leak with allow_noncausal_routing=True."
            )
        refuse_settings(config, "expert_choice", "a token-choice setting: each expert chooses its tokens by affinity")

    @classmethod
    def settings(cls, config) -> dict[str, str]:
        """The capacity as expert choice reads it. The generic capacity rows of a card would call an unset
        `eval_capacity_factor` dropless; here evaluation uses the training factor instead."""
        unit = "sequence" if config.capacity_scope == "sequence" else "batch"
        if config.expert_capacity is not None:
            return {"Expert choice capacity": f"C = {config.expert_capacity} tokens per expert per {unit}"}
        eval_factor = (
            config.eval_capacity_factor if config.eval_capacity_factor is not None else config.capacity_factor
        )
        return {
            "Expert choice capacity": (
                f"C = ceil(c * tokens / {config.num_local_experts}) per expert per {unit}, at least "
                f"{config.min_capacity}; c = {config.capacity_factor} in training, {eval_factor} in evaluation"
            )
        }

    @classmethod
    def experts_per_token(cls, config) -> float:
        """The paper's c = `capacity_factor`: the average experts per token (a token gets at most E).

        A fixed `expert_capacity` gives no per-token average without knowing T (E * C / T), so the parameter counts
        then fall back to `num_experts_per_tok`.
        """
        if config.capacity_factor is not None:
            return min(config.capacity_factor, config.num_local_experts)
        return config.num_experts_per_tok
