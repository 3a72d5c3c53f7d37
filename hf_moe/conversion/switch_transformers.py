"""Import a transformers Switch Transformers model as a T5 MoE model: same weights, same routing, same logits.

Switch Transformers (Fedus et al. 2021) is T5 v1.0 with top-1 MoE feed-forward layers, so every weight has a place in
`T5MoeForConditionalGeneration`:

```
Switch (transformers)                                  T5 MoE (hf_moe)
{stack}.block.{i}.layer.{j}.mlp.wi / wo                {stack}.block.{i}.layer.{j}.DenseReluDense.wi / wo  (dense)
{stack}.block.{i}.layer.{j}.mlp.router.classifier      {stack}.block.{i}.layer.{j}.DenseReluDense.router
{stack}.block.{i}.layer.{j}.mlp.experts.expert_{e}.wi  ...DenseReluDense.experts.up_proj[e]    (F, D), no transpose
{stack}.block.{i}.layer.{j}.mlp.experts.expert_{e}.wo  ...DenseReluDense.experts.down_proj[e]  (D, F), no transpose
everything else (attention, relative position bias, layer norms, embeddings, LM head): the same name
```
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import SwitchTransformersForConditionalGeneration

from ..modeling import T5MoeConfig, T5MoeForConditionalGeneration

__all__ = ["from_switch_transformers"]


def from_switch_transformers(
    model_or_path: SwitchTransformersForConditionalGeneration | str | os.PathLike,
) -> T5MoeForConditionalGeneration:
    """Convert a `SwitchTransformersForConditionalGeneration` (a model, or a local folder it was saved to).

    Routing is Switch's: top-1, the expert output scaled by the raw router probability (`normalize_top_k_weights=False`),
    multiplicative router jitter (`router_jitter_noise`), the same coefficients for the balance and z losses, and MoE in
    the blocks Switch made sparse (its `encoder_sparse_step` / `decoder_sparse_step` rule, read off the model). The
    experts' inner dropout is Switch's `dropout_rate` (`expert_dropout`). The result has the source's dtype, training
    mode and generation config.

    Capacity is Switch's: every expert takes at most `expert_capacity` tokens of each *sequence*, in training and
    evaluation alike, the first ones by position (`capacity_scope="sequence"`, `expert_capacity`, drop policy
    "position"). So the logits equal Switch's (up to float rounding, in eval mode) at any `expert_capacity`, binding
    or not, for any batch and sequence lengths, and while decoding one token per row.

    Semantic differences (by design, not fixable by a mapping):
    - padding: Switch routes padding tokens like any other (they take capacity and enter its losses); hf_moe puts
      padding last in the capacity order and leaves it out of the router losses;
    - router losses: Switch adds them only with `output_router_logits=True`, skips a stack whose sparse step is 1
      (every layer sparse), pools a stack's layers, computes the balance loss per sequence and sums the two stacks;
      hf_moe adds them whenever labels are given and averages per-layer losses over all MoE layers, so `loss` differs though logits agree;
    - jitter: transformers' Switch router multiplies its input in place, so in float32 training the experts see the
      jittered states too; hf_moe jitters the router's input only, as in the paper;
    - precision: hf_moe routes in float32 whatever Switch's `router_dtype`;
    - router logits are returned per layer as (batch * sequence, experts), not (batch, sequence, experts).
    """
    if isinstance(model_or_path, SwitchTransformersForConditionalGeneration):
        switch = model_or_path
    elif isinstance(model_or_path, (str, os.PathLike)):
        switch = SwitchTransformersForConditionalGeneration.from_pretrained(model_or_path)
    else:
        raise TypeError(
            "model_or_path must be a SwitchTransformersForConditionalGeneration or the path of a folder it was saved "
            f"to, got {type(model_or_path).__name__}"
        )
    source_config = switch.config
    if source_config.router_bias:
        raise ValueError("router_bias=True is not supported: hf_moe's routers have no bias")
    for stack_name in ("encoder", "decoder"):
        if not torch.equal(getattr(switch, stack_name).embed_tokens.weight, switch.shared.weight):
            raise ValueError(
                f"{stack_name}.embed_tokens differs from shared: T5 MoE, like T5, uses one input embedding for both "
                "stacks (a Switch model with tie_word_embeddings=False leaves them untied)"
            )
    model = T5MoeForConditionalGeneration(_config_from_switch(switch))
    if not source_config.tie_word_embeddings:
        # T5 ties the LM head to the embedding in memory; a Switch model with its own head keeps it (a saved folder
        # then holds both, and loading leaves them untied, as for T5 v1.1 checkpoints)
        model.lm_head.weight = nn.Parameter(torch.empty_like(model.shared.weight))
        model.all_tied_weights_keys.pop("lm_head.weight", None)
    model.load_state_dict(_state_dict_from_switch(switch), strict=True)
    model.generation_config = switch.generation_config.__class__.from_dict(switch.generation_config.to_dict())
    return model.to(switch.dtype).train(switch.training)


def _config_from_switch(switch: SwitchTransformersForConditionalGeneration) -> T5MoeConfig:
    source = switch.config
    token_ids = {
        name: getattr(source, name)
        for name in ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id")
        if getattr(source, name, None) is not None
    }
    return T5MoeConfig(
        vocab_size=source.vocab_size,
        d_model=source.d_model,
        d_kv=source.d_kv,
        d_ff=source.d_ff,
        num_layers=source.num_layers,
        num_decoder_layers=source.num_decoder_layers,
        num_heads=source.num_heads,
        relative_attention_num_buckets=source.relative_attention_num_buckets,
        relative_attention_max_distance=source.relative_attention_max_distance,
        dropout_rate=source.dropout_rate,
        layer_norm_epsilon=source.layer_norm_epsilon,
        initializer_factor=source.initializer_factor,
        # Switch's FFN is always T5 v1.0's non-gated wi -> act -> wo
        feed_forward_proj=source.dense_act_fn,
        use_cache=source.use_cache,
        # T5 reads this as "scale the decoder output by d_model**-0.5", which Switch does exactly when it ties
        tie_word_embeddings=source.tie_word_embeddings,
        **token_ids,
        num_local_experts=source.num_experts,
        num_experts_per_tok=1,
        normalize_top_k_weights=False,
        router_type="topk",
        router_jitter_noise=float(source.router_jitter_noise),
        router_aux_loss_coef=source.router_aux_loss_coef,
        router_z_loss_coef=source.router_z_loss_coef,
        aux_loss_type="switch",
        # Switch initializes its routers with std = initializer_factor
        router_init_std=source.initializer_factor,
        expert_dropout=source.dropout_rate,
        expert_capacity=source.expert_capacity,
        capacity_scope="sequence",
        drop_policy="position",
        encoder_moe_layers=[i for i, block in enumerate(switch.encoder.block) if block.is_sparse],
        decoder_moe_layers=[i for i, block in enumerate(switch.decoder.block) if block.is_sparse],
    )


@torch.no_grad()
def _state_dict_from_switch(switch: SwitchTransformersForConditionalGeneration) -> dict[str, torch.Tensor]:
    state = {
        name.replace(".mlp.", ".DenseReluDense."): tensor
        for name, tensor in switch.state_dict().items()
        if ".mlp.router." not in name and ".mlp.experts." not in name
    }
    for stack_name in ("encoder", "decoder"):
        for i, block in enumerate(getattr(switch, stack_name).block):
            feed_forward = block.layer[-1]
            if not feed_forward.is_sparse:
                continue
            prefix = f"{stack_name}.block.{i}.layer.{len(block.layer) - 1}.DenseReluDense"
            experts = [feed_forward.mlp.experts[f"expert_{e}"] for e in range(switch.config.num_experts)]
            state[f"{prefix}.router.weight"] = feed_forward.mlp.router.classifier.weight
            # nn.Linear layout on both sides: (F, D) and (D, F) per expert, stacked along a new expert axis
            state[f"{prefix}.experts.up_proj"] = torch.stack([expert.wi.weight for expert in experts])
            state[f"{prefix}.experts.down_proj"] = torch.stack([expert.wo.weight for expert in experts])
    return state
