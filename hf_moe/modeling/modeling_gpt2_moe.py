"""GPT-2 MoE: transformers' GPT-2 with sparse Mixture-of-Experts feed-forward blocks.

Written as a diff over `transformers.models.gpt2`: the attention, embeddings, heads and generation are GPT-2's; what
changes is marked "the diff with GPT-2". Every method restated from GPT-2 is marked `@restates` with the hash of the
GPT-2 source it was restated from; a test fails, naming the method, when the installed GPT-2 differs.

The language-model loss adds the router losses whenever labels are given. Outputs follow transformers' tuple order:
the MoE fields (`aux_loss`, `z_loss`, `router_logits`) are None, so absent from a tuple, unless labels are given or
`output_router_logits=True`; without labels `[0]` is the logits.

Shape legend: B batch, S sequence, D hidden size, F expert hidden size, E experts, K experts per token.

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.integrations import use_experts_implementation
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2Block,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2PreTrainedModel,
)
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from ._compat import parent_recorders, restates
from .configuration_gpt2_moe import GPT2MoeConfig
from .experts import MoeExperts
from .losses import accumulation_share, mean_over_layers
from .moe_pretrained import ROUTER_OUTPUT_RECORDERS, MoePreTrainedMixin, ask_for_router_losses
from .shared_experts import SharedExperts
from .sparse_moe import SparseMoeBlock

__all__ = [
    "GPT2MoeCausalLMOutput",
    "GPT2MoeExperts",
    "GPT2MoeForCausalLM",
    "GPT2MoeForSequenceClassification",
    "GPT2MoeModel",
    "GPT2MoeModelOutput",
    "GPT2MoePreTrainedModel",
    "GPT2MoeSequenceClassifierOutput",
]


@use_experts_implementation(has_bias=True, has_gate=False, is_transposed=True)
class GPT2MoeExperts(MoeExperts):
    """GPT-2's MLP, E times: `Conv1D` layout (in, out), so dense weights copy in without a transpose; biases;
    non-gated activation (`config.activation_function`)."""

    def __init__(self, config: GPT2MoeConfig):
        super().__init__(
            config,
            hidden_size=config.n_embd,
            intermediate_size=config.expert_intermediate_size,
            activation=config.activation_function,
            gated=False,
            bias=True,
            transposed=True,
        )


@dataclass
class GPT2MoeModelOutput(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus GPT-2's cross-attentions and each MoE layer's router losses."""

    cross_attentions: tuple[torch.Tensor, ...] | None = None
    router_balance_losses: tuple[torch.Tensor, ...] | None = None
    router_z_losses: tuple[torch.Tensor, ...] | None = None


@dataclass
class GPT2MoeCausalLMOutput(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the router z-loss and cross-attentions. `loss` includes the weighted
    `aux_loss` and `z_loss` (means over MoE layers) whenever labels are given."""

    z_loss: torch.Tensor | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class GPT2MoeSequenceClassifierOutput(SequenceClassifierOutputWithPast):
    """`SequenceClassifierOutputWithPast` plus the router losses and logits."""

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class GPT2MoeBlock(GPT2Block):
    """A GPT-2 block whose feed-forward is a sparse MoE block when its index is in `config.moe_layer_indices`."""

    def __init__(self, config: GPT2MoeConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.is_moe = layer_idx in config.moe_layer_indices
        if self.is_moe:
            # the diff with GPT-2: mlp -> sparse MoE block, then GPT-2's residual dropout (the dense MLP's last step);
            # built from this layer's config (its own expert count in a PR-MoE pyramid)
            config = config.moe_layer_config_of_block(layer_idx)
            shared = None
            if config.num_shared_experts or config.residual_moe:
                shared = SharedExperts(
                    config, hidden_size=config.n_embd, activation=config.activation_function, gated=False, bias=True,
                    transposed=True,
                )  # fmt: skip
            self.mlp = SparseMoeBlock(config, GPT2MoeExperts(config), shared)
            self.mlp_dropout = nn.Dropout(config.resid_pdrop)

    @restates("models.gpt2.modeling_gpt2.GPT2Block.forward", "f64f1ea064fe0b6b")
    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = False,
        moe_token_mask: torch.Tensor | None = None,
        moe_input_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # GPT-2's block, restated to hand the MoE feed-forward what routing needs beyond the hidden states: the padding
        # mask (losses and capacity skip padding) and the token ids (hash routing)
        residual = hidden_states
        hidden_states = self.ln_1(hidden_states)
        attn_output, _ = self.attn(
            hidden_states, cache=cache, attention_mask=attention_mask, use_cache=use_cache, **kwargs
        )
        hidden_states = attn_output + residual

        if encoder_hidden_states is not None:
            if not hasattr(self, "crossattention"):
                raise ValueError(
                    "encoder_hidden_states were passed, but this block has no cross-attention: "
                    "set `add_cross_attention=True` in the config"
                )
            residual = hidden_states
            cross_attn_output, _ = self.crossattention(
                self.ln_cross_attn(hidden_states),
                cache=cache,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
            )
            hidden_states = residual + cross_attn_output

        residual = hidden_states
        hidden_states = self.ln_2(hidden_states)
        if self.is_moe:
            feed_forward = self.mlp(hidden_states, token_mask=moe_token_mask, input_ids=moe_input_ids)
            feed_forward = self.mlp_dropout(feed_forward)
        else:
            feed_forward = self.mlp(hidden_states)
        return residual + feed_forward


class GPT2MoePreTrainedModel(MoePreTrainedMixin, GPT2PreTrainedModel):
    config: GPT2MoeConfig
    config_class = GPT2MoeConfig
    _no_split_modules = ["GPT2MoeBlock"]
    _can_record_outputs = {**parent_recorders(GPT2PreTrainedModel), **ROUTER_OUTPUT_RECORDERS}

    _auto_map_heads = {
        "AutoModel": "GPT2MoeModel",
        "AutoModelForCausalLM": "GPT2MoeForCausalLM",
        "AutoModelForSequenceClassification": "GPT2MoeForSequenceClassification",
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, GPT2MoeExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            # GPT-2's scaled init of the residual projections: 2 residual paths per block
            init.normal_(module.down_proj, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)
        elif isinstance(module, SharedExperts):
            module.init_weights(std, std / math.sqrt(2 * self.config.n_layer))


class GPT2MoeModel(GPT2MoePreTrainedModel, GPT2Model):
    _records_outputs = True
    _block_stack = "h"
    _per_layer_norms = (nn.LayerNorm,)
    _final_norm = "ln_f"

    @restates("models.gpt2.modeling_gpt2.GPT2Model.__init__", "0318594f09c2deb1")
    def __init__(self, config: GPT2MoeConfig):
        # GPT2Model.__init__ hard-codes GPT2Block, so its body is restated here; the diff: GPT2MoeBlock
        GPT2MoePreTrainedModel.__init__(self, config)
        self.embed_dim = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, self.embed_dim)
        self.wpe = nn.Embedding(config.max_position_embeddings, self.embed_dim)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPT2MoeBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self._attn_implementation = config._attn_implementation
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> GPT2MoeModelOutput | tuple:
        r"""
        output_router_balance_losses, output_router_z_losses (`bool`, *optional*):
            Return every MoE layer's load-balancing / z-loss (the heads ask for them when they compute a loss).
        """
        return_dict = kwargs.pop("return_dict", getattr(self.config, "return_dict", True))
        # the diff with GPT-2: the MoE blocks get the padding mask and the ids of the new tokens
        moe_token_mask = None
        if attention_mask is not None and attention_mask.ndim == 2:
            new_tokens = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            moe_token_mask = attention_mask[:, -new_tokens:]
        outputs = super().forward(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache,
            moe_token_mask=moe_token_mask,
            moe_input_ids=input_ids,
            return_dict=True,
            **kwargs,
        )
        outputs = GPT2MoeModelOutput(**outputs)
        return outputs if return_dict else outputs.to_tuple()


def _router_losses(outputs: GPT2MoeModelOutput) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return mean_over_layers(outputs.router_balance_losses), mean_over_layers(outputs.router_z_losses)


def _with_router_losses(loss, aux_loss, z_loss, config: GPT2MoeConfig, share) -> torch.Tensor:
    """`loss` + the configured coefficients x router losses (always: a configured coefficient is never ignored)."""
    if aux_loss is not None:
        loss = loss + config.aux_loss_coef * share * aux_loss.to(loss.device)
    if z_loss is not None:
        loss = loss + config.router_z_loss_coef * share * z_loss.to(loss.device)
    return loss


class GPT2MoeForCausalLM(GPT2MoePreTrainedModel, GPT2LMHeadModel, GenerationMixin):
    @restates("models.gpt2.modeling_gpt2.GPT2LMHeadModel.__init__", "c8db161dc2fc264e")
    def __init__(self, config: GPT2MoeConfig):
        # GPT2LMHeadModel.__init__ builds a dense GPT2Model; the diff: GPT2MoeModel
        GPT2MoePreTrainedModel.__init__(self, config)
        self.transformer = GPT2MoeModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    @restates("models.gpt2.modeling_gpt2.GPT2LMHeadModel.forward", "6a2c3b0db18c6744")
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> GPT2MoeCausalLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels (shifted inside the model, -100 ignored). With labels, `loss` is the language-model loss
            plus `router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss`.
        output_router_logits (`bool`, *optional*):
            Return every MoE layer's router logits, each of shape `(batch_size * sequence_length, num_experts)`, and
            `aux_loss` / `z_loss` also without labels.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        ask_for_router_losses(self, labels, output_router_logits, kwargs)
        outputs: GPT2MoeModelOutput = self.transformer(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        aux_loss, z_loss = _router_losses(outputs)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
            # the loss shifts labels: position 0 of each row is never a target
            share = accumulation_share(labels[..., 1:].ne(-100).sum(), kwargs.get("num_items_in_batch"))
            loss = _with_router_losses(loss, aux_loss, z_loss, self.config, share)

        return GPT2MoeCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
            router_logits=outputs.router_logits,
        )


class GPT2MoeForSequenceClassification(GPT2MoePreTrainedModel, GPT2ForSequenceClassification):
    # the classification loss is a mean over examples, not normalized by `num_items_in_batch`: let Trainer scale it
    accepts_loss_kwargs = False

    @restates("models.gpt2.modeling_gpt2.GPT2ForSequenceClassification.__init__", "df17ff29bdac102a")
    def __init__(self, config: GPT2MoeConfig):
        # GPT2ForSequenceClassification.__init__ builds a dense GPT2Model; the diff: GPT2MoeModel
        GPT2MoePreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.transformer = GPT2MoeModel(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        self.post_init()

    @restates("models.gpt2.modeling_gpt2.GPT2ForSequenceClassification.forward", "9b4d38cda8049820")
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> GPT2MoeSequenceClassifierOutput:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        ask_for_router_losses(self, labels, output_router_logits, kwargs)
        outputs: GPT2MoeModelOutput = self.transformer(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), self._last_token_index(input_ids)]
        aux_loss, z_loss = _router_losses(outputs)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
            loss = _with_router_losses(loss, aux_loss, z_loss, self.config, share=1.0)

        return GPT2MoeSequenceClassifierOutput(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=pooled_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def _last_token_index(self, input_ids: torch.LongTensor | None) -> torch.Tensor | int:
        """GPT-2's pooling: the rightmost non-padding token (left or right padding), or the last position."""
        pad_token_id = self.config.pad_token_id
        if input_ids is None or pad_token_id is None:
            if input_ids is not None and input_ids.shape[0] != 1:
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (config.pad_token_id).")
            return -1
        non_pad_mask_BS = (input_ids != pad_token_id).to(torch.int32)
        positions_S = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
        return (positions_S * non_pad_mask_BS).argmax(-1)
