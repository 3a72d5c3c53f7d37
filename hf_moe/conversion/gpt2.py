"""GPT-2 -> GPT-2 MoE: which classes map to which, and where each layer's dense FFN weights live.

GPT-2's `Conv1D` stores weights as (in, out); `GPT2MoeExperts` uses the same transposed layout, so no weight needs a
transpose: c_fc.weight (D, F) -> up_proj[e], c_fc.bias (F) -> up_proj_bias[e], c_proj.weight (F, D) -> down_proj[e],
c_proj.bias (D) -> down_proj_bias[e].
"""

from __future__ import annotations

import transformers
from torch import nn

from ..modeling import (
    GPT2MoeConfig,
    GPT2MoeForCausalLM,
    GPT2MoeForSequenceClassification,
    GPT2MoeModel,
)
from .init_methods import DenseFFN
from .layer_selection import select_layers

MODEL_TYPES = ("gpt2",)
TARGET_CLASSES = {
    "GPT2LMHeadModel": GPT2MoeForCausalLM,
    "GPT2Model": GPT2MoeModel,
    "GPT2ForSequenceClassification": GPT2MoeForSequenceClassification,
}
DEFAULT_SOURCE_CLASS = transformers.GPT2LMHeadModel


def moe_config(dense_config, moe_fields: dict, layer_specs: dict) -> GPT2MoeConfig:
    if layer_specs.get("encoder_moe_layers") is not None or layer_specs.get("decoder_moe_layers") is not None:
        raise ValueError("encoder_moe_layers / decoder_moe_layers are for T5; GPT-2 takes moe_layers")
    moe_layers = select_layers(layer_specs.get("moe_layers"), dense_config.n_layer, "moe_layers")
    return GPT2MoeConfig(**dense_config_fields(dense_config), moe_layers=moe_layers, **moe_fields)


def dense_config_fields(dense_config) -> dict:
    fields = dense_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    return fields


def moe_layers_of(config: GPT2MoeConfig) -> list[int]:
    return config.moe_layer_indices


def dense_intermediate_size(dense_config) -> int:
    return dense_config.n_inner if dense_config.n_inner is not None else 4 * dense_config.n_embd


def layer_pairs(dense_model: nn.Module, moe_model: nn.Module, config: GPT2MoeConfig):
    """(label, dense FFN module, its weights, MoE block) for every layer that becomes MoE."""
    dense_base, moe_base = dense_model.base_model, moe_model.base_model
    for i in config.moe_layer_indices:
        mlp = dense_base.h[i].mlp
        yield f"h.{i}", mlp, dense_ffn(mlp), moe_base.h[i].mlp


def dense_ffn(mlp: nn.Module) -> DenseFFN:
    return DenseFFN(
        tensors={
            "up_proj": mlp.c_fc.weight,
            "up_proj_bias": mlp.c_fc.bias,
            "down_proj": mlp.c_proj.weight,
            "down_proj_bias": mlp.c_proj.bias,
        },
        neuron_axes={"up_proj": 1, "up_proj_bias": 0, "down_proj": 0, "down_proj_bias": None},
        output_biases=("down_proj_bias",),
    )


def expert_parameters(expert_tensors: dict) -> dict:
    """Experts' tensors by parameter name (GPT-2's names already match)."""
    return expert_tensors
