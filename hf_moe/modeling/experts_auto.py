"""hf_moe's default experts implementation, "hf_moe_auto": one sort, then grouped or padded batched GEMMs by shape.

Shape legend: T tokens, D hidden size, F expert hidden size, E experts, K experts per token, N = T * K slots,
C the most slots any expert got in this call.

Registered in transformers' experts interface, `ALL_EXPERTS_FUNCTIONS` (so `set_experts_implementation` and
`from_pretrained(experts_implementation=...)` accept it, and switch back to "grouped_mm" / "eager" / "batched_mm"),
with transformers' experts contract `forward(hidden_TD, top_k_index_TK, top_k_weights_TK) -> out_TD`.

```
slots sorted by expert (one sort)  ->  x_ND gathered in that order (index_select)
  grouped:  transformers' grouped GEMM over the per-expert row ranges          (no host sync)
  padded:   rows scattered into an (E, C, D) batch, two bmm, gathered back      (one host sync: C)
weights applied, slots put back in token order (index_copy), summed over K
```
Why not transformers' "grouped_mm" as it is: its gather (`hidden[perm]`) and un-permute (`out[inverse_perm]`) are
advanced indexing, whose backward is an accumulating `index_put_` that cost about 15% of a small-shape training step
on CPU; `index_select` / `index_copy` have a scatter-add or a gather of rows as backward instead (the block's step at T 256,
D 64, E 8, K 2 took 20-34% less time in our runs). Why the padded path: on CPU `torch._grouped_mm` runs one matmul per expert in forward and two in
backward, and with a few rows per expert of a large layer (decoding a batch of tokens, 2-16 rows per expert at
D 768 / F 3072) one bmm over (E, C, D) ran faster than those calls, at the price of the padding rows. It is taken
only where that price is bounded, the layer is large and a host sync is free (CPU, see `use_padded_batches`); CUDA
keeps the grouped kernel. At small layers (D 64) it was never faster, so they stay grouped.

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import torch

from ._compat import grouped_linear, register_experts_function

__all__ = [
    "AUTO_EXPERTS_IMPLEMENTATION",
    "EXPERTS_IMPLEMENTATIONS",
    "auto_experts_forward",
    "padding_may_pay",
    "use_padded_batches",
]

AUTO_EXPERTS_IMPLEMENTATION = "hf_moe_auto"
# every implementation the families run, the default first: ours, then transformers' three
EXPERTS_IMPLEMENTATIONS = (AUTO_EXPERTS_IMPLEMENTATION, "grouped_mm", "eager", "batched_mm")
# The padded path runs every expert on C rows. It is taken while all four hold (measured on the 2-core CPU: the
# experts' forward + backward at D 64 / F 256 and D 768 / F 3072, forward-only decoding at D 768 / F 3072, and the
# whole block at the small shapes of `benchmarks/moe_layer.py --quick`; README "Experts implementations"):
# - the experts average at most this many rows (at D 768 padded took 0.79-0.81x the grouped time at 2-16 rows,
#   1.11x at 64, and 0.72-0.75x when decoding 8-16 tokens);
MAX_ROWS_PER_EXPERT_FOR_PADDING = 16
# - a row costs at least this many multiply-adds (D x F): at D 64 / F 256 the padded block was never faster
#   (0.93-1.09x the grouped block on evenly loaded rows, 1.33-1.37x at 32 experts);
MIN_MULTIPLY_ADDS_PER_ROW_FOR_PADDING = 2**20
# - the padding adds at most this factor of rows (E * C <= factor * N): skewed loads stay grouped;
MAX_PADDING_FACTOR = 2.0
# - at least this share of the experts has rows: the padded path reads every expert's weights, the grouped one only
#   those with rows (decoding one token at top-2 of 8 would read 4x the weights).
MIN_SHARE_OF_EXPERTS_WITH_ROWS = 0.75


def padding_may_pay(num_slots: int, num_experts: int, multiply_adds_per_row: int) -> bool:
    """The conditions of `use_padded_batches` known before the rows are counted: checked first, so that layers which
    can never take the padded path (small layers, training batches) pay no count and no host read."""
    return (
        num_slots <= MAX_ROWS_PER_EXPERT_FOR_PADDING * num_experts
        and multiply_adds_per_row >= MIN_MULTIPLY_ADDS_PER_ROW_FOR_PADDING
    )


def use_padded_batches(
    num_slots: int, num_experts: int, most_rows: int, experts_with_rows: int, multiply_adds_per_row: int
) -> bool:
    """Whether `num_slots` rows, at most `most_rows` for one of `num_experts` experts and at least one for
    `experts_with_rows` of them, each row costing `multiply_adds_per_row` (D x F), go through the padded path."""
    return (
        padding_may_pay(num_slots, num_experts, multiply_adds_per_row)
        and num_experts * most_rows <= MAX_PADDING_FACTOR * num_slots
        and experts_with_rows >= MIN_SHARE_OF_EXPERTS_WITH_ROWS * num_experts
    )


def _grouped_gemm_aligned(experts, x_ND: torch.Tensor) -> bool:
    """torch's grouped GEMM needs every row of its operands to be a multiple of 16 bytes long (D and F here)."""
    row_elements = 16 // x_ND.element_size()
    return experts.hidden_dim % row_elements == 0 and experts.intermediate_dim % row_elements == 0


def _up_weights(experts) -> tuple[torch.Tensor, torch.Tensor | None]:
    if experts.has_gate:
        return experts.gate_up_proj, experts.gate_up_proj_bias if experts.has_bias else None
    return experts.up_proj, experts.up_proj_bias if experts.has_bias else None


def _activate(experts, hidden: torch.Tensor) -> torch.Tensor:
    return experts._apply_gate(hidden) if experts.has_gate else experts.act_fn(hidden)


def _grouped(experts, x_ND: torch.Tensor, expert_N: torch.Tensor, rows_per_expert_E=None) -> torch.Tensor:
    """Rows sorted by expert through the grouped GEMM; rows of ids >= E (expert-parallel sentinels) come out 0.
    `rows_per_expert_E`: the rows' counts where the caller has them already (without sentinels)."""
    num_experts = experts.num_experts
    if rows_per_expert_E is None:
        # histc, not bincount: no host sync and capturable in CUDA graphs (CPU's histc takes floats only); ids >= E
        # fall outside its range, so the offsets end before the sentinel tail, which the kernel leaves unwritten
        counts_input = expert_N.float() if expert_N.device.type in ("cpu", "mps") else expert_N.int()
        rows_per_expert_E = torch.histc(counts_input, bins=num_experts, min=0, max=num_experts - 1)
    offsets_E = torch.cumsum(rows_per_expert_E, dim=0, dtype=torch.int32)
    sentinel_N1 = None
    if experts._is_expert_parallel:
        sentinel_N1 = (expert_N >= num_experts).unsqueeze(-1)
        expert_N = expert_N.clamp(max=num_experts - 1)
        x_ND = x_ND.masked_fill(sentinel_N1, 0.0)  # its backward zeroes the unwritten tail of the input gradient
    up_weight, up_bias = _up_weights(experts)
    hidden = grouped_linear(
        x_ND,
        up_weight,
        offsets_E,
        None if up_bias is None else up_bias.index_select(0, expert_N),
        experts.is_transposed,
    )
    if sentinel_N1 is not None:
        hidden = hidden.masked_fill(sentinel_N1, 0.0)
    down_bias = experts.down_proj_bias.index_select(0, expert_N) if experts.has_bias else None
    out = grouped_linear(_activate(experts, hidden), experts.down_proj, offsets_E, down_bias, experts.is_transposed)
    return out if sentinel_N1 is None else out.masked_fill(sentinel_N1, 0.0)


def _batched_linear(x_ECI: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool):
    out = torch.bmm(x_ECI, weight if transposed else weight.transpose(1, 2))
    return out if bias is None else out + bias.unsqueeze(1)


def _padded(experts, x_ND: torch.Tensor, expert_N: torch.Tensor, rows_per_expert_E, most_rows: int) -> torch.Tensor:
    """Rows sorted by expert through one (E, C, D) batch per projection; padding rows are computed and discarded."""
    num_experts, num_slots = experts.num_experts, x_ND.shape[0]
    first_row_E = torch.cumsum(rows_per_expert_E, dim=0) - rows_per_expert_E
    position_N = torch.arange(num_slots, device=x_ND.device) - first_row_E[expert_N]
    padded_row_N = expert_N * most_rows + position_N
    # index_copy / index_select: their backwards are a row gather and a row scatter-add (rows are unique here)
    x_ECD = x_ND.new_zeros(num_experts * most_rows, x_ND.shape[-1]).index_copy(0, padded_row_N, x_ND)
    x_ECD = x_ECD.view(num_experts, most_rows, x_ND.shape[-1])
    up_weight, up_bias = _up_weights(experts)
    hidden = _batched_linear(x_ECD, up_weight, up_bias, experts.is_transposed)
    down_bias = experts.down_proj_bias if experts.has_bias else None
    out_ECD = _batched_linear(_activate(experts, hidden), experts.down_proj, down_bias, experts.is_transposed)
    return out_ECD.reshape(num_experts * most_rows, out_ECD.shape[-1]).index_select(0, padded_row_N)


def auto_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts contract: out_TD = sum over k of top_k_weights[t, k] * expert_{top_k_index[t, k]}(x_t).
    Expert-parallel sentinel ids (>= E, weight 0) contribute 0 and cost no expert FLOPs."""
    num_tokens, top_k = top_k_index.shape
    expert_N, slot_N = torch.sort(top_k_index.reshape(-1))
    x_ND = hidden_states.index_select(0, slot_N // top_k)
    weight_N1 = top_k_weights.reshape(-1).index_select(0, slot_N).unsqueeze(-1)
    out_ND, rows_per_expert_E = None, None
    # the padded path reads C back to the host: only where that costs nothing (CPU) and can be traced (eager), or
    # where torch's grouped GEMM cannot take the rows; expert-parallel sentinels stay on the grouped path (it skips
    # them; expert parallelism shards whole experts, so alignment is as without it)
    if not self._is_expert_parallel and not torch.compiler.is_compiling():
        grouped_ok = _grouped_gemm_aligned(self, x_ND)
        multiply_adds_per_row = self.hidden_dim * self.intermediate_dim
        on_cpu_and_may_pay = hidden_states.device.type == "cpu" and padding_may_pay(
            expert_N.numel(), self.num_experts, multiply_adds_per_row
        )
        if on_cpu_and_may_pay or not grouped_ok:
            rows_per_expert_E = torch.bincount(expert_N, minlength=self.num_experts)
            most_rows, experts_with_rows = torch.stack([rows_per_expert_E.max(), rows_per_expert_E.count_nonzero()])
            most_rows, experts_with_rows = most_rows.tolist(), experts_with_rows.tolist()  # the one host sync
            if not grouped_ok or use_padded_batches(
                expert_N.numel(), self.num_experts, most_rows, experts_with_rows, multiply_adds_per_row
            ):
                out_ND = _padded(self, x_ND, expert_N, rows_per_expert_E, most_rows)
    if out_ND is None:
        out_ND = _grouped(self, x_ND, expert_N, rows_per_expert_E)
    weighted_ND = out_ND * weight_N1.to(out_ND.dtype)
    in_token_order_ND = torch.zeros_like(weighted_ND).index_copy(0, slot_N, weighted_ND)
    # reshape + sum rather than index_add_: deterministic on GPU, like transformers' kernels
    return in_token_order_ND.view(num_tokens, top_k, weighted_ND.shape[-1]).sum(dim=1).to(hidden_states.dtype)


register_experts_function(AUTO_EXPERTS_IMPLEMENTATION, auto_experts_forward)
