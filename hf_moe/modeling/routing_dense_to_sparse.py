"""The dense-to-sparse gate (Nie et al. 2021, "Dense-to-Sparse Gate for Mixture-of-Experts", arXiv 2112.14397;
the gate of EvoMoE), `router_type="dense_to_sparse"`.

Shape legend: T tokens, D hidden size, E experts, K = `num_experts_per_tok` (the most experts a token may use).

```
logits_TE = h_TD W^T + g_TE                       g ~ Gumbel(0, 1) in training, 0 at evaluation
gate_TE   = softmax(logits_TE / temperature)      the combine weights (not renormalized over the active experts)
active    = the K largest gates that exceed gate_threshold, and always the largest one
```
A high temperature spreads the gate over every expert, so every expert is active and trains on every token (dense);
as `DenseToSparseCallback` anneals the temperature the gate concentrates and the active set shrinks to about one
expert per token (sparse). The paper trains without a balance loss, hence `default_aux_loss_coef = 0`; set
`router_aux_loss_coef` to add one. Inactive slots hold the sentinel id E with weight 0 (`leaves_slots_unused`).

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .routing import TOKEN_CHOICE_SETTINGS, Router, RouterDecision, RoutingInputs, refuse_settings

__all__ = ["DenseToSparseRouter"]


class DenseToSparseRouter(Router):
    """Gumbel-softmax gate with a temperature; every expert whose gate weight exceeds `gate_threshold` is active."""

    leaves_slots_unused = True
    default_aux_loss_coef = 0.0

    def __init__(self, config, hidden_size: int):
        super().__init__(config, hidden_size)
        self.threshold = float(config.gate_threshold)
        # A plain attribute, as `TopKRouter.temperature`: `DenseToSparseCallback` sets it on every rank alike and
        # writes the final value to `config.router_temperature`
        self.temperature = float(config.router_temperature)
        self.weight = nn.Parameter(torch.empty(self.num_experts, hidden_size))

    def forward(self, inputs: RoutingInputs) -> RouterDecision:
        hidden_TD = inputs.hidden_TD
        # float32 routing whatever the autocast dtype, like every router
        with torch.autocast(device_type=hidden_TD.device.type, enabled=False):
            logits_TE = F.linear(hidden_TD.float(), self.weight.float())
            if self.training:
                # Gumbel(0, 1) noise, -log(Exp(1)): sampling from the gate's categorical distribution, relaxed
                logits_TE = logits_TE - torch.empty_like(logits_TE).exponential_().log()
            # the decision's logits stay untempered, as every router's (see `RouterDecision`)
            gate_TE = torch.softmax(logits_TE / self.temperature, dim=-1)
            gate_TK, index_TK = torch.topk(gate_TE, self.top_k, dim=-1)
            active_TK = gate_TK > self.threshold
            active_TK[:, 0] = True  # a token always keeps its best expert, whatever the threshold
            index_TK = torch.where(active_TK, index_TK, self.num_experts)
        return RouterDecision(logits_TE, index_TK, gate_TK * active_TK, gate_TE)

    @classmethod
    def settings(cls, config) -> dict[str, str]:
        return {"Gate threshold": str(config.gate_threshold), "Gate temperature": str(config.router_temperature)}

    @classmethod
    def validate_config(cls, config) -> None:
        # its noise is Gumbel's and its combine weights are the gate's: the other token-choice settings do nothing
        unused = {name: off for name, off in TOKEN_CHOICE_SETTINGS.items() if name != "router_temperature"}
        refuse_settings(config, "dense_to_sparse", "it adds Gumbel noise and combines with the gate weights", unused)
