"""T5 / mT5 -> T5 MoE: which classes map to which, and where each layer's dense FFN weights live.

T5's FFN sublayer is `block[i].layer[-1].DenseReluDense`, `nn.Linear` layout (out, in), no biases:
- v1.0 (`T5DenseActDense`): wi.weight (F, D) -> up_proj[e], wo.weight (D, F) -> down_proj[e];
- v1.1 / Flan / mT5 (`T5DenseGatedActDense`): wi_0 (activation side) and wi_1 stacked as gate_up_proj[e] =
  [wi_0; wi_1] (2F, D), the layout transformers' gated experts kernels split with `chunk(2)`; wo -> down_proj[e].
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

from ..modeling import T5MoeConfig, T5MoeEncoderModel, T5MoeForConditionalGeneration, T5MoeModel
from .init_methods import DenseFFN
from .layer_selection import select_layers

MODEL_TYPES = ("t5", "mt5")
TARGET_CLASSES = {
    "T5ForConditionalGeneration": T5MoeForConditionalGeneration,
    "T5Model": T5MoeModel,
    "T5EncoderModel": T5MoeEncoderModel,
    "MT5ForConditionalGeneration": T5MoeForConditionalGeneration,
    "MT5Model": T5MoeModel,
    "MT5EncoderModel": T5MoeEncoderModel,
}
DEFAULT_SOURCE_CLASS = transformers.T5ForConditionalGeneration


def dense_intermediate_size(dense_config) -> int:
    return dense_config.d_ff


def moe_config(dense_config, moe_fields: dict, layer_specs: dict) -> T5MoeConfig:
    # `moe_layers` applies to both stacks unless a stack has its own spec
    shared = layer_specs.get("moe_layers")
    encoder_spec = layer_specs.get("encoder_moe_layers") or shared
    decoder_spec = layer_specs.get("decoder_moe_layers") or shared
    fields = dense_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    # T5 v1.0 rescales the decoder output before a tied LM head, v1.1 does not; mT5's config has no such field
    # because mT5 never rescales, and T5MoeConfig would otherwise guess from `tie_word_embeddings`
    fields["scale_decoder_outputs"] = getattr(dense_config, "scale_decoder_outputs", False)
    return T5MoeConfig(
        **fields,
        encoder_moe_layers=select_layers(encoder_spec, dense_config.num_layers, "encoder_moe_layers"),
        decoder_moe_layers=select_layers(decoder_spec, dense_config.num_decoder_layers, "decoder_moe_layers"),
        **moe_fields,
    )


def moe_layers_of(config: T5MoeConfig) -> dict[str, list[int]]:
    return {"encoder": config.encoder_moe_layer_indices, "decoder": config.decoder_moe_layer_indices}


def layer_pairs(dense_model: nn.Module, moe_model: nn.Module, config: T5MoeConfig):
    """(label, dense FFN module, its weights, MoE block) for every layer that becomes MoE."""
    stacks = [("encoder", config.encoder_moe_layer_indices), ("decoder", config.decoder_moe_layer_indices)]
    for stack_name, indices in stacks:
        dense_stack, moe_stack = getattr(dense_model, stack_name, None), getattr(moe_model, stack_name, None)
        if dense_stack is None:  # an encoder-only model has no decoder
            continue
        for i in indices:
            ffn = dense_stack.block[i].layer[-1].DenseReluDense
            yield f"{stack_name}.block.{i}", ffn, dense_ffn(ffn), moe_stack.block[i].layer[-1].DenseReluDense


def dense_ffn(ffn: nn.Module) -> DenseFFN:
    if hasattr(ffn, "wi_0"):  # gated (v1.1 / Flan / mT5)
        return DenseFFN(
            tensors={"gate": ffn.wi_0.weight, "up": ffn.wi_1.weight, "down_proj": ffn.wo.weight},
            neuron_axes={"gate": 0, "up": 0, "down_proj": 1},
        )
    return DenseFFN(
        tensors={"up_proj": ffn.wi.weight, "down_proj": ffn.wo.weight}, neuron_axes={"up_proj": 0, "down_proj": 1}
    )


def expert_parameters(expert_tensors: dict) -> dict:
    """Experts' tensors by parameter name: a gated FFN's halves become one `gate_up_proj` (E, 2F, D)."""
    if "gate" not in expert_tensors:
        return expert_tensors
    gate_up = torch.cat([expert_tensors["gate"], expert_tensors["up"]], dim=1)
    return {"gate_up_proj": gate_up, "down_proj": expert_tensors["down_proj"]}
