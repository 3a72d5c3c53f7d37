"""GPT-2 MoE configuration: a `GPT2Config` plus the shared MoE fields and the choice of MoE blocks.

Hub portability: this file travels with every saved checkpoint; only torch / transformers / huggingface_hub and
single-dot siblings.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config

from .configuration_moe import MoeConfigFields, validate_layer_list

__all__ = ["GPT2MoeConfig"]


@strict
class GPT2MoeConfig(MoeConfigFields, GPT2Config):
    r"""GPT-2 with sparse Mixture-of-Experts feed-forward blocks.

    Every `GPT2Config` field keeps its meaning; the MoE fields are documented in `MoeConfigFields`.

    Example:

    ```python
    >>> from hf_moe import GPT2MoeConfig, GPT2MoeForCausalLM
    >>> config = GPT2MoeConfig(n_layer=2, n_embd=64, n_head=4, num_experts=4, num_experts_per_tok=2)
    >>> model = GPT2MoeForCausalLM(config)
    ```"""

    model_type = "gpt2_moe"
    attribute_map = {**GPT2Config.attribute_map, "num_experts": "num_local_experts"}

    # Parallel layouts are data (transformers' `DistributedConfig`, see `hf_moe.parallel`). Expert parallelism: each
    # rank holds E / ep_size whole experts (dim 0 of every expert weight and bias) and the experts module reaches
    # them through transformers' token all-to-all. Keys are relative to `GPT2MoeModel`; dense blocks match nothing.
    base_model_ep_plan = {
        "h.*.mlp.experts.up_proj": "grouped_gemm",
        "h.*.mlp.experts.up_proj_bias": "grouped_gemm",
        "h.*.mlp.experts.down_proj": "grouped_gemm",
        "h.*.mlp.experts.down_proj_bias": "grouped_gemm",
        "h.*.mlp.experts": "ep_dispatch_experts",
    }
    # FSDP2 units (`fsdp_size`): every block (GPT-2's names, not transformers' default `layers.*`). The token
    # embedding stays in the root unit with the LM head it is tied to: FSDP2 keeps a shared parameter tied only inside
    # one unit.
    base_model_fsdp_plan = {"h.*": "free_full_weight"}

    # indices of the blocks whose feed-forward is MoE; None: every block
    moe_layers: list[int] | None = None

    def validate_moe_layers(self):
        validate_layer_list("moe_layers", self.moe_layers, self.n_layer)

    @property
    def moe_layer_indices(self) -> list[int]:
        """Sorted indices of the MoE blocks."""
        return sorted(self.moe_layers) if self.moe_layers is not None else list(range(self.n_layer))

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    @property
    def moe_layers_description(self) -> str:
        return f"blocks {self.moe_layer_indices}"

    @property
    def moe_layers_per_stack(self) -> list[int]:
        return [self.num_moe_layers]

    def moe_layer_config_of_block(self, layer_idx: int):
        """The config block `layer_idx`'s MoE layer is built from (`moe_layer_config`)."""
        return self.moe_layer_config(self.moe_layer_indices.index(layer_idx))

    @property
    def has_causal_moe_layers(self) -> bool:
        """Whether some MoE layer sits in a causal stack (every GPT-2 block is causal)."""
        return bool(self.moe_layer_indices)

    @property
    def dense_intermediate_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size if self.moe_intermediate_size is not None else self.dense_intermediate_size

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts without building the model: `total`, `active` (used per token), `experts` (routed), and
        `shared_experts` (always active, so in `active` whole)."""
        hidden, inner, expert_inner = self.n_embd, self.dense_intermediate_size, self.expert_intermediate_size
        layer_norm = 2 * hidden
        attention = hidden * 3 * hidden + 3 * hidden + hidden * hidden + hidden
        dense_ffn = 2 * hidden * inner + inner + hidden
        shared_inner = self.shared_experts_intermediate_size
        shared_experts = (2 * hidden * shared_inner + shared_inner + hidden if shared_inner else 0) + (
            hidden if self.shared_expert_gate else 0
        )
        num_dense = self.n_layer - self.num_moe_layers
        non_moe = (
            self.vocab_size * hidden
            + self.n_positions * hidden
            + self.n_layer * (2 * layer_norm + attention)
            + layer_norm
            + num_dense * dense_ffn
        )
        if not self.tie_word_embeddings:
            non_moe += self.vocab_size * hidden
        one_expert = 2 * hidden * expert_inner + expert_inner + hidden
        repeated = 0
        if self.share_blocks_across_layers:
            # WideNet stores block 0's attention and the first dense block's MLP; the other blocks use them
            repeated = (self.n_layer - 1) * attention + max(num_dense - 1, 0) * dense_ffn
        return self.moe_parameter_counts(non_moe, hidden, one_expert, shared_experts, repeated)
