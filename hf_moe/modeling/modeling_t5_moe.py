"""T5 MoE: transformers' T5 (v1.0 and v1.1 / Flan-T5) with sparse Mixture-of-Experts feed-forward sublayers.

Written as a diff over `transformers.models.t5`: attention, relative position bias, embeddings, the LM head and
generation are T5's; what changes is marked "the diff with T5", and every method restated from T5 is marked `@restates`
with the hash of the T5 source it was restated from (a test fails, naming the method, when the installed T5 differs). T5's FFN sublayer is `T5LayerFF` (layer_norm ->
DenseReluDense -> dropout -> residual); in an MoE block, DenseReluDense is a sparse MoE block whose experts are E
copies of T5's FFN, stored as 3D parameters in `nn.Linear` layout (out, in), without biases:

```
T5 v1.0  "relu"        wi -> relu -> wo                 up_proj (E, F, D) = wi,  down_proj (E, D, F) = wo
T5 v1.1  "gated-gelu"  gelu(wi_0 x) * wi_1 x -> wo      gate_up_proj (E, 2F, D) = [wi_0; wi_1],  down_proj = wo
```
(the activation side first: transformers' `_default_apply_gate` splits [gate; up]).

Router losses: every MoE layer computes its own balance and z losses on its own routing, padding excluded.
`aux_loss` / `z_loss` are means over *all* MoE layers of both stacks, so each MoE layer weighs the same whichever stack
it is in and a coefficient means what it means in the GPT-2 family; `encoder_*` / `decoder_*` are the per-stack means.
With labels: loss = cross-entropy + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss. The MoE output
fields are None unless labels are given or `output_router_logits=True`, so tuples are stock T5's otherwise.

Padding: the encoder's MoE layers skip the tokens `attention_mask` marks as padding; the decoder's skip those
`decoder_attention_mask` marks or, when it is not given, the positions labelled -100 (how `DataCollatorForSeq2Seq`
pads labels; it passes no decoder mask).

Shape legend: B batch, S sequence, D d_model, F expert hidden size, E experts, K experts per token.

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.integrations import use_experts_implementation
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_outputs import (
    BaseModelOutput,
    MoEModelOutput,
    MoEModelOutputWithPastAndCrossAttentions,
    Seq2SeqMoEModelOutput,
    Seq2SeqMoEOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.models.t5.modeling_t5 import (
    T5Block,
    T5DenseActDense,
    T5DenseGatedActDense,
    T5EncoderModel,
    T5ForConditionalGeneration,
    T5LayerCrossAttention,
    T5LayerFF,
    T5LayerNorm,
    T5LayerSelfAttention,
    T5Model,
    T5PreTrainedModel,
    T5Stack,
)
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import ModelOutput

from ._compat import parent_recorders, restates, set_experts_implementation_of_copy, update_parallel_plans
from .configuration_t5_moe import T5MoeConfig
from .experts import MoeExperts
from .losses import accumulation_share, mean_over_layers
from .moe_pretrained import ROUTER_OUTPUT_RECORDERS, MoePreTrainedMixin, ask_for_router_losses
from .shared_experts import SharedExperts
from .sparse_moe import SparseMoeBlock

__all__ = [
    "T5MoeEncoderModel",
    "T5MoeEncoderOutput",
    "T5MoeExperts",
    "T5MoeForConditionalGeneration",
    "T5MoeGatedExperts",
    "T5MoeModel",
    "T5MoeModelOutput",
    "T5MoePreTrainedModel",
    "T5MoeSeq2SeqLMOutput",
    "T5MoeStackOutput",
]


@use_experts_implementation(has_bias=False, has_gate=False, is_transposed=False)
class T5MoeExperts(MoeExperts):
    """T5 v1.0's FFN (`T5DenseActDense`), E times: wi -> `config.dense_act_fn` -> wo, no biases."""

    def __init__(self, config: T5MoeConfig):
        super().__init__(
            config,
            hidden_size=config.d_model,
            intermediate_size=config.expert_intermediate_size,
            activation=config.dense_act_fn,
            gated=False,
            bias=False,
            transposed=False,
        )


@use_experts_implementation(has_bias=False, has_gate=True, is_transposed=False)
class T5MoeGatedExperts(MoeExperts):
    """T5 v1.1's gated FFN (`T5DenseGatedActDense`), E times: `gate_up_proj` holds [wi_0; wi_1], the activation
    (`config.dense_act_fn`) applies to the wi_0 half, no biases."""

    def __init__(self, config: T5MoeConfig):
        super().__init__(
            config,
            hidden_size=config.d_model,
            intermediate_size=config.expert_intermediate_size,
            activation=config.dense_act_fn,
            gated=True,
            bias=False,
            transposed=False,
        )


@dataclass
class T5MoeStackOutput(MoEModelOutputWithPastAndCrossAttentions):
    """One T5 stack's output plus each of its MoE layers' router losses (router logits on request)."""

    router_balance_losses: tuple[torch.Tensor, ...] | None = None
    router_z_losses: tuple[torch.Tensor, ...] | None = None


@dataclass
class T5MoeEncoderOutput(MoEModelOutput):
    """`MoEModelOutput` plus the encoder's router losses (means over its MoE layers) and each layer's."""

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_balance_losses: tuple[torch.Tensor, ...] | None = None
    router_z_losses: tuple[torch.Tensor, ...] | None = None


@dataclass
class T5MoeModelOutput(Seq2SeqMoEModelOutput):
    """`Seq2SeqMoEModelOutput` plus the router losses: per stack (means over its MoE layers) and over all MoE layers."""

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    encoder_aux_loss: torch.Tensor | None = None
    encoder_z_loss: torch.Tensor | None = None
    decoder_aux_loss: torch.Tensor | None = None
    decoder_z_loss: torch.Tensor | None = None


@dataclass
class T5MoeSeq2SeqLMOutput(Seq2SeqMoEOutput):
    """`Seq2SeqMoEOutput` plus `aux_loss` / `z_loss`, the means over all MoE layers of both stacks. `loss` includes
    them, weighted by `router_aux_loss_coef` / `router_z_loss_coef`, whenever labels are given."""

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


class T5MoeLayerFF(T5LayerFF):
    """T5's feed-forward sublayer; its DenseReluDense is a sparse MoE block when `is_moe`."""

    @restates("models.t5.modeling_t5.T5LayerFF.__init__", "b9906be831e8047c")
    def __init__(self, config: T5MoeConfig, is_moe: bool):
        # T5LayerFF.__init__ hard-codes the dense FFN, so its body is restated; the diff: the sparse MoE block
        nn.Module.__init__(self)
        self.is_moe = is_moe
        if is_moe:
            experts = T5MoeGatedExperts(config) if config.is_gated_act else T5MoeExperts(config)
            shared = None
            if config.num_shared_experts or config.residual_moe:
                shared = SharedExperts(
                    config, hidden_size=config.d_model, activation=config.dense_act_fn, gated=config.is_gated_act,
                    bias=False, transposed=False,
                )  # fmt: skip
            self.DenseReluDense = SparseMoeBlock(config, experts, shared)
        elif config.is_gated_act:
            self.DenseReluDense = T5DenseGatedActDense(config)
        else:
            self.DenseReluDense = T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    @restates("models.t5.modeling_t5.T5LayerFF.forward", "b7f2c285f08b51b0")
    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        forwarded_states = self.layer_norm(hidden_states)
        if self.is_moe:
            forwarded_states = self.DenseReluDense(forwarded_states, token_mask=token_mask, input_ids=input_ids)
        else:
            forwarded_states = self.DenseReluDense(forwarded_states)
        return hidden_states + self.dropout(forwarded_states)


def _clamp_inf_in_fp16(hidden_states: torch.Tensor) -> torch.Tensor:
    # T5's guard for fp16 training: activations that overflowed to inf are clamped back to the largest finite value
    if hidden_states.dtype != torch.float16:
        return hidden_states
    clamp_value = torch.where(
        torch.isinf(hidden_states).any(),
        torch.finfo(hidden_states.dtype).max - 1000,
        torch.finfo(hidden_states.dtype).max,
    )
    return torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)


class T5MoeBlock(T5Block):
    """A T5 block whose FFN sublayer is MoE when its index is in the stack's MoE layer list."""

    @restates("models.t5.modeling_t5.T5Block.__init__", "b8840d8372c24805")
    def __init__(self, config: T5MoeConfig, has_relative_attention_bias: bool = False, layer_idx: int | None = None):
        # T5Block.__init__ hard-codes T5LayerFF, so its body is restated; the diff: T5MoeLayerFF
        nn.Module.__init__(self)
        self.is_decoder = config.is_decoder
        moe_layers = config.decoder_moe_layer_indices if config.is_decoder else config.encoder_moe_layer_indices
        self.is_moe = layer_idx in moe_layers
        self.layer = nn.ModuleList()
        self.layer.append(
            T5LayerSelfAttention(config, has_relative_attention_bias=has_relative_attention_bias, layer_idx=layer_idx)
        )
        if self.is_decoder:
            self.layer.append(T5LayerCrossAttention(config, layer_idx=layer_idx))
        # the FFN of an MoE block is built from its layer's config (its own expert count in a PR-MoE pyramid)
        ffn_config = config.moe_layer_config_of_block(layer_idx, self.is_decoder) if self.is_moe else config
        self.layer.append(T5MoeLayerFF(ffn_config, is_moe=self.is_moe))

    @restates("models.t5.modeling_t5.T5Block.forward", "6ace6334def256c3")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        encoder_decoder_position_bias: torch.Tensor | None = None,
        cache: Cache | None = None,
        moe_token_mask: torch.Tensor | None = None,
        moe_input_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        # T5's block, restated to hand the FFN sublayer what routing needs beyond the hidden states: the padding mask
        # (router losses and capacity skip padding) and the token ids (hash routing)
        hidden_states, self_attn_position_bias, _ = self.layer[0](
            hidden_states, attention_mask=attention_mask, position_bias=position_bias, cache=cache, **kwargs
        )
        hidden_states = _clamp_inf_in_fp16(hidden_states)

        cross_attn_position_bias = None
        if self.is_decoder and encoder_hidden_states is not None:
            hidden_states, cross_attn_position_bias, _ = self.layer[1](
                hidden_states,
                key_value_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                position_bias=encoder_decoder_position_bias,
                cache=cache,
                **kwargs,
            )
            hidden_states = _clamp_inf_in_fp16(hidden_states)

        hidden_states = self.layer[-1](hidden_states, token_mask=moe_token_mask, input_ids=moe_input_ids)
        return _clamp_inf_in_fp16(hidden_states), self_attn_position_bias, cross_attn_position_bias


class T5MoePreTrainedModel(MoePreTrainedMixin, T5PreTrainedModel):
    config: T5MoeConfig
    config_class = T5MoeConfig
    _no_split_modules = ["T5MoeBlock"]
    # T5 keeps its FFN output projection `wo` in float32 under float16 loading; the experts' `down_proj` is its copy
    _keep_in_fp32_modules = ["wo", "experts.down_proj"]
    _can_record_outputs = {**parent_recorders(T5PreTrainedModel), **ROUTER_OUTPUT_RECORDERS}

    _auto_map_heads = {
        "AutoModel": "T5MoeModel",
        "AutoModelForSeq2SeqLM": "T5MoeForConditionalGeneration",
        "AutoModelForTextEncoding": "T5MoeEncoderModel",
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        factor = self.config.initializer_factor
        if isinstance(module, (T5MoeExperts, T5MoeGatedExperts)):
            # T5's init of its FFN, per expert: std = factor / sqrt(fan-in)
            up_proj = module.gate_up_proj if module.has_gate else module.up_proj
            init.normal_(up_proj, mean=0.0, std=factor * self.config.d_model**-0.5)
            init.normal_(module.down_proj, mean=0.0, std=factor * module.intermediate_dim**-0.5)
        elif isinstance(module, SharedExperts):
            width = self.config.shared_experts_intermediate_size
            module.init_weights(factor * self.config.d_model**-0.5, factor * width**-0.5)

    def init_parallel_plans(self) -> None:
        super().init_parallel_plans()
        # the diff with T5: the config's EP / FSDP rules name modules inside a stack (`block.*...`). A stack keeps the
        # rules that match its own modules (gated or not), and its parent takes them with the `encoder.` / `decoder.`
        # prefix; the parent drops the unprefixed copies, which match nothing at its level.
        config_rules = set(self.config.base_model_ep_plan or {}) | set(self.config.base_model_fsdp_plan or {})
        if isinstance(self, T5Stack):
            names = {_layer_wildcards(name) for name, _ in [*self.named_modules(), *self.named_parameters()]}
            unused = config_rules - names
        else:
            unused = config_rules
        update_parallel_plans(self, keep=lambda rule: rule not in unused)

    def set_experts_implementation(self, experts_implementation: str | dict):
        super().set_experts_implementation(experts_implementation)
        # the diff with T5: its stacks hold deep copies of the config (with `is_decoder` flipped), and transformers
        # skips sub-models whose config has the model's own class; the experts read their stack's copy, so update it
        for module in self.modules():
            if isinstance(module, PreTrainedModel) and module.config is not self.config:
                set_experts_implementation_of_copy(module.config, self.config._experts_implementation)


def _layer_wildcards(name: str) -> str:
    # how transformers writes a module name in a parallel plan: `block.3.layer.1` -> `block.*.layer.*`
    return re.sub(r"\.\d+(\.|$)", r".*\1", name)


class T5MoeStack(T5MoePreTrainedModel, T5Stack):
    """T5's encoder or decoder stack with MoE blocks."""

    _records_outputs = True
    _block_stack = "block"
    _per_layer_norms = (T5LayerNorm,)
    _final_norm = "final_layer_norm"

    @restates("models.t5.modeling_t5.T5Stack.__init__", "ff626b133fd00ba5")
    def __init__(self, config: T5MoeConfig):
        # T5Stack.__init__ hard-codes T5Block, so its body is restated; the diff: T5MoeBlock
        T5MoePreTrainedModel.__init__(self, config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.is_decoder = config.is_decoder
        self.block = nn.ModuleList(
            [
                T5MoeBlock(config, has_relative_attention_bias=bool(i == 0), layer_idx=i)
                for i in range(config.num_layers)
            ]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.post_init()
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        moe_token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> T5MoeStackOutput | tuple:
        r"""
        moe_token_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for the new tokens that count in the router losses and capacity, 0 for padding. Default: the last
            `sequence_length` columns of a 2D `attention_mask`, else every token counts.
        output_router_balance_losses, output_router_z_losses (`bool`, *optional*):
            Return every MoE layer's load-balancing / z-loss (the heads ask for them when they compute a loss).
        """
        return_dict = kwargs.pop("return_dict", getattr(self.config, "return_dict", True))
        # the diff with T5: the MoE blocks get the padding mask and the ids of the new tokens
        if moe_token_mask is None and attention_mask is not None and attention_mask.ndim == 2:
            new_tokens = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            moe_token_mask = attention_mask[:, -new_tokens:]
        outputs = super().forward(
            input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            moe_token_mask=moe_token_mask,
            moe_input_ids=input_ids,
            return_dict=True,
            **kwargs,
        )
        outputs = T5MoeStackOutput(**outputs)
        return outputs if return_dict else outputs.to_tuple()


def _build_stacks(config: T5MoeConfig) -> tuple[T5MoeStack, T5MoeStack]:
    """T5's encoder and decoder, each on its own copy of the config (as T5Model builds them)."""
    encoder_config = copy.deepcopy(config)
    encoder_config.is_decoder = False
    encoder_config.use_cache = False
    decoder_config = copy.deepcopy(config)
    decoder_config.is_decoder = True
    decoder_config.num_layers = config.num_decoder_layers
    return T5MoeStack(encoder_config), T5MoeStack(decoder_config)


def _stack_router_losses(outputs) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """A stack's per-layer (balance, z) losses; empty when the outputs do not carry them (e.g. user-made
    `encoder_outputs`)."""
    return getattr(outputs, "router_balance_losses", None) or (), getattr(outputs, "router_z_losses", None) or ()


def _router_losses(encoder_outputs, decoder_outputs) -> dict[str, torch.Tensor | None]:
    encoder_balance, encoder_z = _stack_router_losses(encoder_outputs)
    decoder_balance, decoder_z = _stack_router_losses(decoder_outputs)
    return {
        "aux_loss": mean_over_layers(encoder_balance + decoder_balance),
        "z_loss": mean_over_layers(encoder_z + decoder_z),
        "encoder_aux_loss": mean_over_layers(encoder_balance),
        "encoder_z_loss": mean_over_layers(encoder_z),
        "decoder_aux_loss": mean_over_layers(decoder_balance),
        "decoder_z_loss": mean_over_layers(decoder_z),
    }


def _encode_decode(
    model: T5MoeModel | T5MoeForConditionalGeneration,
    input_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    decoder_input_ids: torch.LongTensor | None,
    decoder_attention_mask: torch.Tensor | None,
    encoder_outputs,
    cache: Cache | None,
    inputs_embeds: torch.Tensor | None,
    decoder_inputs_embeds: torch.Tensor | None,
    use_cache: bool | None,
    decoder_moe_token_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[ModelOutput, T5MoeStackOutput]:
    """T5's encode (unless `encoder_outputs` are given) then decode, as in `T5Model.forward`."""
    if encoder_outputs is None:
        encoder_outputs = model.encoder(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )
    elif not isinstance(encoder_outputs, ModelOutput):
        encoder_outputs = BaseModelOutput(
            last_hidden_state=encoder_outputs[0],
            hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
            attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
        )
    decoder_outputs = model.decoder(
        input_ids=decoder_input_ids,
        attention_mask=decoder_attention_mask,
        inputs_embeds=decoder_inputs_embeds,
        cache=cache,
        encoder_hidden_states=encoder_outputs[0],
        encoder_attention_mask=attention_mask,
        use_cache=use_cache,
        moe_token_mask=decoder_moe_token_mask,
        **kwargs,
    )
    return encoder_outputs, decoder_outputs


class T5MoeModel(T5MoePreTrainedModel, T5Model):
    @restates("models.t5.modeling_t5.T5Model.__init__", "75755acd94b1f907")
    def __init__(self, config: T5MoeConfig):
        # T5Model.__init__ builds dense T5Stacks; the diff: T5MoeStack
        T5MoePreTrainedModel.__init__(self, config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder, self.decoder = _build_stacks(config)
        self.post_init()

    @restates("models.t5.modeling_t5.T5Model.forward", "a8c93f5303d9961c")
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.BoolTensor | None = None,
        encoder_outputs: tuple[tuple[torch.Tensor]] | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> T5MoeModelOutput:
        r"""
        output_router_logits (`bool`, *optional*):
            Return every MoE layer's router logits, each of shape `(batch_size * sequence_length, num_experts)`, and
            the router losses.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        ask_for_router_losses(self, None, output_router_logits, kwargs)
        encoder_outputs, decoder_outputs = _encode_decode(
            self,
            input_ids,
            attention_mask,
            decoder_input_ids,
            decoder_attention_mask,
            encoder_outputs,
            cache,
            inputs_embeds,
            decoder_inputs_embeds,
            use_cache,
            decoder_moe_token_mask=None,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        return T5MoeModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            decoder_router_logits=decoder_outputs.router_logits,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            encoder_router_logits=getattr(encoder_outputs, "router_logits", None),
            **_router_losses(encoder_outputs, decoder_outputs),
        )


class T5MoeForConditionalGeneration(T5MoePreTrainedModel, T5ForConditionalGeneration, GenerationMixin):
    @restates("models.t5.modeling_t5.T5ForConditionalGeneration.__init__", "18fadb1e95e99301")
    def __init__(self, config: T5MoeConfig):
        # T5ForConditionalGeneration.__init__ builds dense T5Stacks; the diff: T5MoeStack
        T5MoePreTrainedModel.__init__(self, config)
        self.model_dim = config.d_model
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder, self.decoder = _build_stacks(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    @restates("models.t5.modeling_t5.T5ForConditionalGeneration.forward", "a24eff1bf1e403c7")
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.BoolTensor | None = None,
        encoder_outputs: tuple[tuple[torch.Tensor]] | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> T5MoeSeq2SeqLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, target_sequence_length)`, *optional*):
            Target tokens (not shifted: the decoder input is built by shifting them right; -100 ignored). With labels,
            `loss` is the cross-entropy plus `router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss`, and,
            without a `decoder_attention_mask`, the decoder's MoE layers skip the positions labelled -100.
        output_router_logits (`bool`, *optional*):
            Return every MoE layer's router logits, each of shape `(batch_size * sequence_length, num_experts)`, and
            the router losses also without labels.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        ask_for_router_losses(self, labels, output_router_logits, kwargs)
        decoder_moe_token_mask = None
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self._shift_right(labels)
            if decoder_attention_mask is None:
                decoder_moe_token_mask = labels.ne(-100)
        encoder_outputs, decoder_outputs = _encode_decode(
            self,
            input_ids,
            attention_mask,
            decoder_input_ids,
            decoder_attention_mask,
            encoder_outputs,
            cache,
            inputs_embeds,
            decoder_inputs_embeds,
            use_cache,
            decoder_moe_token_mask=decoder_moe_token_mask,
            output_router_logits=output_router_logits,
            **kwargs,
        )

        sequence_output = decoder_outputs.last_hidden_state
        if self.config.scale_decoder_outputs:
            sequence_output = sequence_output * (self.model_dim**-0.5)
        lm_logits = self.lm_head(sequence_output)
        router_losses = _router_losses(encoder_outputs, decoder_outputs)

        loss = None
        if labels is not None:
            labels = labels.to(lm_logits.device)
            num_items_in_batch = kwargs.get("num_items_in_batch")
            # the diff with T5: a sum over labels / `num_items_in_batch` under gradient accumulation (`Trainer`), and
            # the router losses with the configured coefficients
            # reshape, not view: labels may be a non-contiguous slice (stock T5's view crashes on those)
            loss = fixed_cross_entropy(
                lm_logits.reshape(-1, lm_logits.size(-1)), labels.reshape(-1), num_items_in_batch
            )
            share = accumulation_share(labels.ne(-100).sum(), num_items_in_batch)
            aux_loss, z_loss = router_losses["aux_loss"], router_losses["z_loss"]
            if aux_loss is not None:
                loss = loss + self.config.aux_loss_coef * share * aux_loss.to(loss.device)
            if z_loss is not None:
                loss = loss + self.config.router_z_loss_coef * share * z_loss.to(loss.device)

        return T5MoeSeq2SeqLMOutput(
            loss=loss,
            logits=lm_logits,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            decoder_router_logits=decoder_outputs.router_logits,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            encoder_router_logits=getattr(encoder_outputs, "router_logits", None),
            **router_losses,
        )


class T5MoeEncoderModel(T5MoePreTrainedModel, T5EncoderModel):
    @restates("models.t5.modeling_t5.T5EncoderModel.__init__", "0904acc32e6ecb88")
    def __init__(self, config: T5MoeConfig):
        # T5EncoderModel.__init__ builds a dense T5Stack (on the config itself, edited in place as T5 does); the diff:
        # T5MoeStack
        T5MoePreTrainedModel.__init__(self, config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        encoder_config = config
        encoder_config.use_cache = False
        encoder_config.is_encoder_decoder = False
        self.encoder = T5MoeStack(encoder_config)
        self.post_init()

    @restates("models.t5.modeling_t5.T5EncoderModel.forward", "a5be5559d4173f34")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> T5MoeEncoderOutput:
        r"""
        output_router_logits (`bool`, *optional*):
            Return every MoE layer's router logits, each of shape `(batch_size * sequence_length, num_experts)`, and
            the router losses.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        ask_for_router_losses(self, None, output_router_logits, kwargs)
        outputs: T5MoeStackOutput = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        return T5MoeEncoderOutput(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            aux_loss=mean_over_layers(outputs.router_balance_losses),
            z_loss=mean_over_layers(outputs.router_z_losses),
            router_balance_losses=outputs.router_balance_losses,
            router_z_losses=outputs.router_z_losses,
        )
