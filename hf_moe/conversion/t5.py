"""T5 / mT5 -> T5 MoE, declared as data (`FAMILY`): moefy reads nothing else about T5.

T5's FFN is the last sublayer of each block: sublayer 1 of an encoder block (self-attention, FFN), sublayer 2 of a
decoder block (self-attention, cross-attention, FFN). No tensor needs a transpose: T5's `nn.Linear` stores (out, in)
and the T5 experts use the same layout (`is_transposed=False`). No biases. Per MoE layer i of stack s (s.block.i.layer.j):

```
dense (…DenseReluDense.)     experts                        neuron axis
v1.0 (T5DenseActDense, relu)
  wi.weight   (F, D)         up_proj      (E, F, D)         0
  wo.weight   (D, F)         down_proj    (E, D, F)         1
v1.1 / Flan / mT5 (T5DenseGatedActDense)
  wi_0.weight (F, D)         gate_up_proj (E, 2F, D) = [wi_0; wi_1], the layout transformers' gated experts
  wi_1.weight (F, D)                                   kernels split with `chunk(2)`; activation on the wi_0 half
  wo.weight   (D, F)         down_proj    (E, D, F)         1
```
Every other weight (shared embedding, attention, relative position bias, layer norms, dense FFNs of layers that stay
dense, LM head) keeps its name. Shape legend: D hidden size, F dense intermediate size, E experts.
"""

from __future__ import annotations

from types import MappingProxyType

from transformers import PretrainedConfig

from ..modeling import T5MoeConfig, T5MoeEncoderModel, T5MoeForConditionalGeneration, T5MoeModel
from .family import FamilyMapping, FFNKind, FFNTensor, Stack, dense_config_fields

__all__ = ["FAMILY"]

FFN = "{stack}.block.{layer}.layer.{sublayer}.DenseReluDense"


def moe_config(dense_config: PretrainedConfig, moe_fields: dict) -> T5MoeConfig:
    fields = dense_config_fields(dense_config)
    # T5 v1.0 rescales the decoder output before a tied LM head, v1.1 does not; mT5's config has no such field
    # because mT5 never rescales, and T5MoeConfig would otherwise guess from `tie_word_embeddings`
    fields["scale_decoder_outputs"] = getattr(dense_config, "scale_decoder_outputs", False)
    return T5MoeConfig(**fields, **moe_fields)


FAMILY = FamilyMapping(
    name="t5",
    model_types=("t5", "mt5"),
    target_classes=MappingProxyType(
        {
            "T5ForConditionalGeneration": T5MoeForConditionalGeneration,
            "T5Model": T5MoeModel,
            "T5EncoderModel": T5MoeEncoderModel,
            "MT5ForConditionalGeneration": T5MoeForConditionalGeneration,
            "MT5Model": T5MoeModel,
            "MT5EncoderModel": T5MoeEncoderModel,
        }
    ),
    default_source_class="T5ForConditionalGeneration",
    build_config=moe_config,
    block=FFN,
    stacks=(
        Stack(
            name="encoder",
            num_layers="num_layers",
            layer_field="encoder_moe_layers",
            placeholders=MappingProxyType({"stack": "encoder", "sublayer": 1}),
        ),
        Stack(
            name="decoder",
            num_layers="num_decoder_layers",
            layer_field="decoder_moe_layers",
            placeholders=MappingProxyType({"stack": "decoder", "sublayer": 2}),
        ),
    ),
    ffn_kinds=(
        FFNKind(
            name="relu (v1.0)",
            tensors=(
                FFNTensor(f"{FFN}.wi.weight", "up_proj", neuron_axis=0),
                FFNTensor(f"{FFN}.wo.weight", "down_proj", neuron_axis=1),
            ),
        ),
        FFNKind(
            name="gated (v1.1 / mT5)",
            tensors=(
                FFNTensor(f"{FFN}.wi_0.weight", "gate_up_proj", neuron_axis=0, part=0),
                FFNTensor(f"{FFN}.wi_1.weight", "gate_up_proj", neuron_axis=0, part=1),
                FFNTensor(f"{FFN}.wo.weight", "down_proj", neuron_axis=1),
            ),
        ),
    ),
)
