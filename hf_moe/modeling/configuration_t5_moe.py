"""T5 MoE configuration: a `T5Config` plus the shared MoE fields and the choice of MoE blocks in each stack.

Both T5 feed-forward kinds are supported through T5's own `feed_forward_proj`: "relu" (T5 v1.0: wi -> relu -> wo)
and "gated-gelu" (T5 v1.1 / Flan-T5: gelu(wi_0) * wi_1 -> wo).

Hub portability: this file travels with every saved checkpoint; only torch / transformers / huggingface_hub and
single-dot siblings.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import T5Config

from .configuration_moe import MoeConfigFields, validate_layer_list

__all__ = ["T5MoeConfig"]


@strict
class T5MoeConfig(MoeConfigFields, T5Config):
    r"""T5 (encoder-decoder) with sparse Mixture-of-Experts feed-forward sublayers.

    Every `T5Config` field keeps its meaning; the MoE fields are documented in `MoeConfigFields`. Inside the experts,
    `expert_dropout` takes the place of the dense FFN's inner `dropout_rate`.

    Example:

    ```python
    >>> from hf_moe import T5MoeConfig, T5MoeForConditionalGeneration
    >>> config = T5MoeConfig(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, num_experts=4,
    ...                      decoder_moe_layers=[1])
    >>> model = T5MoeForConditionalGeneration(config)
    ```"""

    model_type = "t5_moe"
    attribute_map = {**T5Config.attribute_map, "num_experts": "num_local_experts"}

    # Parallel layouts are data (transformers' `DistributedConfig`, see `hf_moe.parallel`). Keys are relative to a
    # T5 *stack* (`T5MoeStack` is a sub-model; its parent prefixes them with `encoder.` / `decoder.`): an MoE FFN is
    # sublayer 1 of an encoder block and sublayer 2 of a decoder block, hence `layer.*`. Expert parallelism shards
    # dim 0 (experts) of every expert weight; T5 experts have no biases.
    base_model_ep_plan = {
        "block.*.layer.*.DenseReluDense.experts.up_proj": "grouped_gemm",
        "block.*.layer.*.DenseReluDense.experts.gate_up_proj": "grouped_gemm",
        "block.*.layer.*.DenseReluDense.experts.down_proj": "grouped_gemm",
        "block.*.layer.*.DenseReluDense.experts": "ep_dispatch_experts",
    }
    # FSDP2 units (`fsdp_size`): every block; the shared embedding, final norms and head stay with the root unit
    base_model_fsdp_plan = {"block.*": "free_full_weight"}

    # indices of the encoder blocks whose feed-forward is MoE; None: every encoder block, []: none
    encoder_moe_layers: list[int] | None = None
    # indices of the decoder blocks whose feed-forward is MoE; None: every decoder block, []: none
    decoder_moe_layers: list[int] | None = None

    def validate_moe_layers(self):
        validate_layer_list("encoder_moe_layers", self.encoder_moe_layers, self.num_layers)
        validate_layer_list("decoder_moe_layers", self.decoder_moe_layers, self.num_decoder_layers)

    @property
    def encoder_moe_layer_indices(self) -> list[int]:
        """Sorted indices of the encoder's MoE blocks."""
        if self.encoder_moe_layers is None:
            return list(range(self.num_layers))
        return sorted(self.encoder_moe_layers)

    @property
    def decoder_moe_layer_indices(self) -> list[int]:
        """Sorted indices of the decoder's MoE blocks."""
        if self.decoder_moe_layers is None:
            return list(range(self.num_decoder_layers))
        return sorted(self.decoder_moe_layers)

    @property
    def num_moe_layers(self) -> int:
        return len(self.encoder_moe_layer_indices) + len(self.decoder_moe_layer_indices)

    @property
    def moe_layers_per_stack(self) -> list[int]:
        return [len(self.encoder_moe_layer_indices), len(self.decoder_moe_layer_indices)]

    @property
    def moe_layers_description(self) -> str:
        return f"encoder blocks {self.encoder_moe_layer_indices}, decoder blocks {self.decoder_moe_layer_indices}"

    def moe_layer_config_of_block(self, layer_idx: int, decoder: bool):
        """The config the MoE layer of block `layer_idx` of the encoder or decoder is built from (`moe_layer_config`;
        module order: the encoder's MoE layers, then the decoder's)."""
        if decoder:
            index = len(self.encoder_moe_layer_indices) + self.decoder_moe_layer_indices.index(layer_idx)
        else:
            index = self.encoder_moe_layer_indices.index(layer_idx)
        return self.moe_layer_config(index)

    @property
    def has_causal_moe_layers(self) -> bool:
        """Whether some MoE layer sits in a causal stack (the decoder's; the encoder sees its whole input)."""
        return bool(self.decoder_moe_layer_indices)

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size if self.moe_intermediate_size is not None else self.d_ff

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts of the encoder-decoder model without building it: `total`, `active` (used per token),
        `experts` (routed), `shared_experts` (always active, so in `active` whole). T5 ties the LM head and both
        stacks' token embeddings to `shared`, so the embedding counts once."""
        hidden, inner = self.d_model, self.num_heads * self.d_kv
        ffn_matrices = 3 if self.is_gated_act else 2  # wi_0, wi_1, wo or wi, wo; T5 has no biases
        attention = 4 * hidden * inner  # q, k, v, o
        relative_bias = self.relative_attention_num_buckets * self.num_heads  # first block of each stack only
        dense_ffn = ffn_matrices * hidden * self.d_ff
        shared_experts = ffn_matrices * hidden * self.shared_experts_intermediate_size + (
            hidden if self.shared_expert_gate else 0
        )
        num_dense = self.num_layers + self.num_decoder_layers - self.num_moe_layers
        # encoder block: self-attention + FFN, two layer norms; decoder block adds cross-attention and its norm
        encoder_block = attention + 2 * hidden
        decoder_block = 2 * attention + 3 * hidden
        non_moe = (
            self.vocab_size * hidden
            + self.num_layers * encoder_block
            + self.num_decoder_layers * decoder_block
            + 2 * (relative_bias + hidden)  # each stack: relative position bias and final layer norm
            + num_dense * dense_ffn
        )
        one_expert = ffn_matrices * hidden * self.expert_intermediate_size
        repeated = 0
        if self.share_blocks_across_layers:
            # WideNet: each stack stores its block 0's attention(s) and its first dense block's FFN
            encoder_dense = self.num_layers - len(self.encoder_moe_layer_indices)
            decoder_dense = self.num_decoder_layers - len(self.decoder_moe_layer_indices)
            repeated = (
                (self.num_layers - 1) * attention
                + (self.num_decoder_layers - 1) * 2 * attention
                + (max(encoder_dense - 1, 0) + max(decoder_dense - 1, 0)) * dense_ffn
            )
        return self.moe_parameter_counts(non_moe, hidden, one_expert, shared_experts, repeated)
