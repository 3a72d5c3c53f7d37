"""Shared experts: feed-forward networks every token goes through, beside the routed experts of an MoE layer.

DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066) isolates `num_shared_experts` always-active experts to hold the
knowledge every token needs, so the routed experts need not each learn it again; Qwen2-MoE has one, scaled per token
by a learned sigmoid gate. The layer's output is

    routed_TD + gate_T1 * sum_s shared_s(x_TD),        gate_T1 = sigmoid(x_TD @ w_D1) with the gate, else 1

Residual-MoE (DeepSpeed-MoE, Rajbhandari et al. 2022, arXiv 2201.05596) uses one such FFN as its fixed dense MLP
and mixes it with the routed top-1 expert by a per-token 2-way softmax (`SparseMoeBlock.residual_coefficient`):

    c_T2 = softmax(x_TD @ W_D2 + b_2),      out_TD = c_T2[:, 0] * mlp(x_TD) + c_T2[:, 1] * routed_TD

A sum of FFNs with elementwise activations is one FFN whose hidden units are theirs side by side, so the shared
experts are stored and run as one FFN of their summed width (DeepSeek-V2's `shared_experts` is the same), in the
routed experts' layout and parameter names without the expert dimension (`up_proj` or `gate_up_proj`, `down_proj`,
`*_bias`; (in, out) when `transposed`, GPT-2's `Conv1D` layout). They are dense parameters: replicated under expert
parallelism, trained with the non-expert parameters by the optimizer presets, without expert dropout (every token
trains them, as a dense FFN).

Shape legend: T tokens, D hidden size, F the shared experts' summed hidden size.

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.activations import ACT2FN

__all__ = ["SharedExperts"]


class SharedExperts(nn.Module):
    """`config.num_shared_experts` always-active FFNs as one FFN of width `config.shared_experts_intermediate_size`,
    optionally gated (`config.shared_expert_gate`)."""

    # marks the module for `moe_parts` (found by this text, so copies loaded with trust_remote_code are found too)
    moe_part: ClassVar[str] = "shared_experts"

    def __init__(self, config, *, hidden_size: int, activation: str, gated: bool, bias: bool, transposed: bool):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_shared_experts = config.num_shared_experts or 1  # Residual-MoE: its one dense MLP
        self.gated = gated
        self.transposed = transposed
        self.act_fn = ACT2FN[activation]
        inner = config.shared_experts_intermediate_size
        up_out = 2 * inner if gated else inner

        def weight(out_dim: int, in_dim: int) -> nn.Parameter:
            return nn.Parameter(torch.empty((in_dim, out_dim) if transposed else (out_dim, in_dim)))

        self.up_name = "gate_up_proj" if gated else "up_proj"
        setattr(self, self.up_name, weight(up_out, hidden_size))
        self.down_proj = weight(hidden_size, inner)
        if bias:
            setattr(self, f"{self.up_name}_bias", nn.Parameter(torch.zeros(up_out)))
            self.down_proj_bias = nn.Parameter(torch.zeros(hidden_size))
        # Qwen2-MoE's shared_expert_gate: one logit per token, no bias
        self.gate = nn.Linear(hidden_size, 1, bias=False) if config.shared_expert_gate else None

    def _linear(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = hidden @ weight if self.transposed else hidden @ weight.t()
        return out if bias is None else out + bias

    def forward(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        up_TF = self._linear(hidden_TD, getattr(self, self.up_name), getattr(self, f"{self.up_name}_bias", None))
        if self.gated:
            gate_TF, up_TF = up_TF.chunk(2, dim=-1)  # [gate; up], as the routed experts' gate_up_proj
            hidden_TF = self.act_fn(gate_TF) * up_TF
        else:
            hidden_TF = self.act_fn(up_TF)
        out_TD = self._linear(
            hidden_TF.to(self.down_proj.dtype), self.down_proj, getattr(self, "down_proj_bias", None)
        )
        if self.gate is not None:
            out_TD = out_TD * torch.sigmoid(self.gate(hidden_TD))
        return out_TD.to(hidden_TD.dtype)  # a float32-kept down_proj (T5 in float16) gives float32

    def init_weights(self, up_std: float, down_std: float) -> None:
        """Normal init of the projections (biases 0); the gate's weight starts at 0, so it starts at sigmoid(0) = 1/2
        for every token and learns from there."""
        nn.init.normal_(getattr(self, self.up_name), mean=0.0, std=up_std)
        nn.init.normal_(self.down_proj, mean=0.0, std=down_std)
        for name in (f"{self.up_name}_bias", "down_proj_bias"):
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name))
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
