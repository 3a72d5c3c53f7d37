"""GPT-2 -> GPT-2 MoE, declared as data (`FAMILY`): moefy reads nothing else about GPT-2.

No tensor needs a transpose: GPT-2's `Conv1D` stores weights as (in, out) and `GPT2MoeExperts` uses the same
transposed layout (`is_transposed=True`). Per MoE layer i (names relative to the base model, `transformer`):

```
dense                          experts of h.{i}.mlp    neuron axis
h.{i}.mlp.c_fc.weight   (D, F)  up_proj        (E, D, F)   1
h.{i}.mlp.c_fc.bias     (F,)    up_proj_bias   (E, F)      0
h.{i}.mlp.c_proj.weight (F, D)  down_proj      (E, F, D)   0
h.{i}.mlp.c_proj.bias   (D,)    down_proj_bias (E, D)      none: an output bias ("split" divides it by E)
```
Every other weight (embeddings, attention, layer norms, the dense MLPs of layers that stay dense, the heads) keeps its
name. Shape legend: D hidden size, F dense intermediate size, E experts.
"""

from __future__ import annotations

from types import MappingProxyType

from transformers import PretrainedConfig

from ..modeling import GPT2MoeConfig, GPT2MoeForCausalLM, GPT2MoeForSequenceClassification, GPT2MoeModel
from .family import FamilyMapping, FFNKind, FFNTensor, Stack, dense_config_fields

__all__ = ["FAMILY"]


def moe_config(dense_config: PretrainedConfig, moe_fields: dict) -> GPT2MoeConfig:
    return GPT2MoeConfig(**dense_config_fields(dense_config), **moe_fields)


FAMILY = FamilyMapping(
    name="gpt2",
    model_types=("gpt2",),
    target_classes=MappingProxyType(
        {
            "GPT2LMHeadModel": GPT2MoeForCausalLM,
            "GPT2Model": GPT2MoeModel,
            "GPT2ForSequenceClassification": GPT2MoeForSequenceClassification,
        }
    ),
    default_source_class="GPT2LMHeadModel",
    build_config=moe_config,
    block="h.{layer}.mlp",
    stacks=(Stack(name="decoder", num_layers="n_layer", layer_field="moe_layers"),),
    ffn_kinds=(
        FFNKind(
            name="mlp",
            tensors=(
                FFNTensor("h.{layer}.mlp.c_fc.weight", "up_proj", neuron_axis=1),
                FFNTensor("h.{layer}.mlp.c_fc.bias", "up_proj_bias", neuron_axis=0),
                FFNTensor("h.{layer}.mlp.c_proj.weight", "down_proj", neuron_axis=0),
                FFNTensor("h.{layer}.mlp.c_proj.bias", "down_proj_bias", neuron_axis=None, output_bias=True),
            ),
        ),
    ),
)
