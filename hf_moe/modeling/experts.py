"""Experts: E feed-forward networks stored as 3D parameters, in the layout transformers' experts kernels expect.

Shape legend: T tokens, D hidden size, F expert hidden size, E experts, K experts per token.

A family subclasses `MoeExperts` in its own modeling file and decorates it with transformers'
`@use_experts_implementation(...)` (transformers looks for that text in the model's own source file before it lets
a model switch experts implementation). The decorator dispatches `forward` to "hf_moe_auto" (the families' default,
`experts_auto.py`), transformers' "grouped_mm" and "batched_mm", or this file's "eager" reference loop, all with the
contract `forward(hidden_states_TD, top_k_index_TK, top_k_weights_TK) -> out_TD`.

Parameter names follow transformers: `gate_up_proj` (gated) or `up_proj`, `down_proj`, and `*_bias`.
Weights are (E, out, in) like `nn.Linear`, or (E, in, out) when `is_transposed` (GPT-2's `Conv1D` layout).

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.activations import ACT2FN

__all__ = ["ExpertActivation", "MoeExperts", "check_expert_parallel_layout"]


def check_expert_parallel_layout(config) -> None:
    """Raise `ValueError` if `config.distributed_config` (set by `from_pretrained(distributed_config=...)` before the
    model is built) cannot lay this config's experts out; called when the experts are built, before any weight loads.

    Expert parallelism gives each of the `ep_size` ranks of an expert group `num_local_experts / ep_size` whole
    experts, so the division must be exact (transformers would only find out while sharding, one layer in).
    """
    ep_size = getattr(getattr(config, "distributed_config", None), "ep_size", None) or 1
    if ep_size <= 1:
        return
    num_experts = config.num_local_experts
    if num_experts % ep_size:
        allowed = [size for size in range(1, num_experts + 1) if num_experts % size == 0]
        # a PR-MoE pyramid's layer (MoeLayerConfig) has its own count, from the list
        pyramid = getattr(getattr(config, "_config", None), "num_experts_per_layer", None)
        field = f"an MoE layer of num_experts_per_layer={pyramid}" if pyramid else f"num_local_experts={num_experts}"
        raise ValueError(
            f"DistributedConfig(ep_size={ep_size}) cannot shard {field} ({num_experts} experts): every "
            f"expert-parallel rank holds a layer's experts / ep_size whole experts. Use an ep_size that divides "
            f"{num_experts} ({allowed}) and every other layer's count, or change the expert counts."
        )


def _dropout_on_rank_stream(hidden: torch.Tensor, p: float, rank: int) -> torch.Tensor:
    # Under expert parallelism each rank runs only its own experts, and ranks are seeded alike (Trainer's `set_seed`),
    # so `nn.Dropout` would give experts on different ranks the same masks. Each rank draws from its own stream
    # instead (Colossal-AI's `moe_set_seed` idea): a seed taken from the global CPU generator (reproducible from the
    # seed, saved and restored by Trainer's per-rank RNG checkpoints, no device sync) mixed with the rank.
    base_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    generator = torch.Generator(device=hidden.device).manual_seed(base_seed * 65_537 + rank)
    keep = torch.empty_like(hidden).bernoulli_(1.0 - p, generator=generator)
    return hidden * keep / (1.0 - p)


class ExpertActivation(nn.Module):
    """The experts' activation followed by expert-only dropout (Fedus et al. 2021: higher dropout inside experts).

    Every experts kernel calls `act_fn` on the expert hidden activation (for gated experts: on the gate, which then
    multiplies the up projection), so dropout placed here works for eager, batched_mm and grouped_mm alike, and is
    off in eval mode like any `nn.Dropout`.
    """

    def __init__(self, activation: str, dropout: float):
        super().__init__()
        self.act = ACT2FN[activation]
        self.dropout = nn.Dropout(dropout)
        # this process's rank when the experts are expert-parallel (set by `SparseMoeBlock`), else None
        self.expert_parallel_rank: int | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.act(hidden_states)
        if self.expert_parallel_rank is not None and self.training and self.dropout.p > 0:
            return _dropout_on_rank_stream(hidden_states, self.dropout.p, self.expert_parallel_rank)
        return self.dropout(hidden_states)


class MoeExperts(nn.Module):
    """E feed-forward experts as 3D parameters; `forward` here is the eager reference implementation."""

    # marks the module for `moe_parts` (found by this text, so copies loaded with trust_remote_code are found too)
    moe_part: ClassVar[str] = "experts"

    def __init__(
        self,
        config,
        *,
        hidden_size: int,
        intermediate_size: int,
        activation: str,
        gated: bool,
        bias: bool,
        transposed: bool,
    ):
        super().__init__()
        check_expert_parallel_layout(config)
        self.num_experts = config.num_local_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.activation = ExpertActivation(activation, config.expert_dropout)
        num_experts, hidden, inner = self.num_experts, hidden_size, intermediate_size
        up_out = 2 * inner if gated else inner

        def weight(out_dim: int, in_dim: int) -> nn.Parameter:
            shape = (num_experts, in_dim, out_dim) if transposed else (num_experts, out_dim, in_dim)
            return nn.Parameter(torch.empty(shape))

        if gated:
            self.gate_up_proj = weight(up_out, hidden)
        else:
            self.up_proj = weight(up_out, hidden)
        self.down_proj = weight(hidden, inner)
        if bias:
            bias_name = "gate_up_proj_bias" if gated else "up_proj_bias"
            setattr(self, bias_name, nn.Parameter(torch.zeros(num_experts, up_out)))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden))

    @property
    def act_fn(self):
        """What every experts kernel calls on the expert hidden activation (transformers' name): the activation and
        expert dropout, cast to the output projection's dtype. That cast is a no-op unless `_keep_in_fp32_modules`
        kept `down_proj` in float32 while the rest is float16 (T5); then every kernel's down projection gets matching
        dtypes, as T5's dense `wo` does."""
        return self._activate

    def _activate(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(hidden).to(self.down_proj.dtype)

    def _linear(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = hidden @ weight if self.is_transposed else hidden @ weight.t()
        return out if bias is None else out + bias

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        num_tokens, top_k = top_k_index.shape
        # group the (token, expert) slots by expert with one sort; the counts come back to the host once
        expert_ids_N, perm_N = torch.sort(top_k_index.reshape(-1), stable=True)
        token_ids_N = perm_N // top_k
        counts = torch.bincount(expert_ids_N, minlength=self.num_experts).tolist()
        up_weight = self.gate_up_proj if self.has_gate else self.up_proj
        up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
        down_bias = self.down_proj_bias if self.has_bias else None
        outputs = []
        start = 0
        for expert, count in enumerate(counts[: self.num_experts]):  # ids >= num_experts (EP sentinels) are skipped
            if count == 0:
                continue
            rows = hidden_states[token_ids_N[start : start + count]]
            hidden = self._linear(rows, up_weight[expert], None if up_bias is None else up_bias[expert])
            hidden = self._apply_gate(hidden) if self.has_gate else self.act_fn(hidden)
            outputs.append(
                self._linear(hidden, self.down_proj[expert], None if down_bias is None else down_bias[expert])
            )
            start += count
        kept_slots = start
        out_ND = hidden_states.new_zeros(num_tokens * top_k, hidden_states.shape[-1])
        if outputs:
            out_ND[perm_N[:kept_slots]] = torch.cat(outputs).to(out_ND.dtype)
        weighted_ND = out_ND * top_k_weights.reshape(-1, 1).to(out_ND.dtype)
        # reshape + sum rather than index_add_: deterministic on GPU, like transformers' kernels
        return weighted_ND.view(num_tokens, top_k, weighted_ND.shape[-1]).sum(dim=1)
