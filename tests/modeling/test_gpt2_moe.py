"""The GPT-2 MoE family: config, outputs, losses, equivalence with dense GPT-2, generation, Auto classes."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    pipeline,
)
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

import hf_moe
from hf_moe import GPT2MoeConfig, GPT2MoeForCausalLM, GPT2MoeForSequenceClassification, GPT2MoeModel
from hf_moe.modeling import AUTO_EXPERTS_IMPLEMENTATION, EXPERTS_IMPLEMENTATIONS, RoutingInputs, switch_balance_loss
from tests.conftest import tiny_gpt2_moe_config, tiny_word_tokenizer


def tiny_model(**overrides) -> GPT2MoeForCausalLM:
    return GPT2MoeForCausalLM(tiny_gpt2_moe_config(**overrides)).eval()


# --- config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(num_experts=0), "num_local_experts"),
        (dict(router_type="expert_choice"), "router_type"),
        (dict(aux_loss_type="fancy"), "aux_loss_type"),
        (dict(drop_policy="random"), "drop_policy"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
        (dict(min_capacity=-1), "min_capacity"),
        (dict(expert_dropout=1.0), "expert_dropout"),
        (dict(router_jitter_noise=1.5), "router_jitter_noise"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
        (dict(moe_layers=[0, 2]), "moe_layers"),
        (dict(moe_layers=[1, 1]), "moe_layers"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(StrictDataclassClassValidationError, match=field) as error:
        tiny_gpt2_moe_config(**overrides)
    assert isinstance(error.value.__cause__, ValueError)


def test_config_type_errors_are_caught():
    with pytest.raises(Exception, match="num_experts_per_tok"):
        tiny_gpt2_moe_config(num_experts_per_tok="2")


def test_config_alias_and_defaults():
    config = tiny_gpt2_moe_config(num_experts=6, num_experts_per_tok=1)
    assert config.num_local_experts == 6 and config.num_experts == 6
    assert config.normalizes_top_k_weights is False  # Switch
    assert config.moe_layer_indices == [0, 1]
    assert tiny_gpt2_moe_config(moe_layers=[1]).moe_layer_indices == [1]
    assert config.model_type == "gpt2_moe"


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(moe_layers=[1], router_type="noisy_topk"),
        dict(tie_word_embeddings=False, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=1),
    ],
)
def test_parameter_counts_match_the_built_model(overrides):
    config = tiny_gpt2_moe_config(**overrides)
    model = GPT2MoeForCausalLM(config)
    counts = config.parameter_counts()
    assert counts["total"] == model.num_parameters()
    expert_params = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert counts["experts"] == expert_params
    per_expert = expert_params // (config.num_local_experts * len(config.moe_layer_indices))
    assert counts["active"] == counts["total"] - expert_params + per_expert * config.num_experts_per_tok * len(
        config.moe_layer_indices
    )


# --- outputs and losses ---------------------------------------------------------------------------------------


def test_outputs_are_transformers_moe_outputs_with_router_logits_on_request():
    model = tiny_model(moe_layers=[1])
    input_ids = torch.randint(2, 99, (2, 5))
    out = model(input_ids)
    assert isinstance(out, MoeCausalLMOutputWithPast)
    # nothing MoE-specific asked: no loss field is computed
    assert out.router_logits is None and out.loss is None and out.aux_loss is None and out.z_loss is None
    out = model(input_ids, output_router_logits=True)
    assert len(out.router_logits) == 1 and out.router_logits[0].shape == (10, 4)
    assert out.router_logits[0].dtype == torch.float32
    assert (
        out.aux_loss is not None and out.z_loss is not None
    )  # Mixtral's convention: with router logits, the aux loss


def test_loss_is_lm_loss_plus_weighted_router_losses():
    model = tiny_model(router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    input_ids = torch.randint(2, 99, (2, 7))
    out = model(input_ids, labels=input_ids)
    lm_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 99), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm_loss + 0.5 * out.aux_loss + 0.25 * out.z_loss)
    # the router losses are each layer's loss averaged over layers, not pooled
    per_layer = [
        switch_balance_loss(layer.mlp.router(RoutingInputs(h)), None)
        for layer, h in zip(model.transformer.h, _mlp_inputs(model, input_ids), strict=True)
    ]
    torch.testing.assert_close(out.aux_loss, torch.stack(per_layer).mean())


def _mlp_inputs(model, input_ids):
    captured = []
    hooks = [
        block.mlp.register_forward_pre_hook(lambda module, args: captured.append(args[0].reshape(-1, 32)))
        for block in model.transformer.h
    ]
    model(input_ids)
    for hook in hooks:
        hook.remove()
    return captured


def test_router_losses_reach_the_router_gradients():
    model = tiny_model(router_aux_loss_coef=1.0).train()
    input_ids = torch.randint(2, 99, (2, 7))
    model(input_ids, labels=input_ids).loss.backward()
    for block in model.transformer.h:
        assert block.mlp.router.weight.grad.abs().sum() > 0


def test_padding_does_not_change_the_router_losses():
    model = tiny_model()
    input_ids = torch.randint(2, 99, (2, 6))
    padded = torch.cat([input_ids, torch.full((2, 3), 1)], dim=1)
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 3)], dim=1).long()
    plain = model(input_ids, output_router_logits=True)
    with_padding = model(padded, attention_mask=mask, output_router_logits=True)
    torch.testing.assert_close(plain.aux_loss, with_padding.aux_loss)
    torch.testing.assert_close(plain.z_loss, with_padding.z_loss)
    # and padding is left out of the routing counters
    counted = sum(block.mlp.num_tokens.item() for block in model.transformer.h)
    assert counted == 2 * (12 + 12)


def test_router_loss_does_not_grow_with_gradient_accumulation_steps():
    """Trainer passes `num_items_in_batch` (labels of the whole accumulated batch) when it accumulates gradients."""
    model = tiny_model(router_aux_loss_coef=1.0, router_z_loss_coef=1.0)
    input_ids = torch.randint(2, 99, (2, 8))
    num_labels = input_ids[:, 1:].numel()

    def router_part(ids, num_items):
        out = model(ids, labels=ids, num_items_in_batch=num_items)
        lm = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, 99), ids[:, 1:].reshape(-1), reduction="sum"
        )
        return out.loss - lm / num_items

    one_step = router_part(input_ids, num_labels)
    # the same batch seen as two accumulation steps of identical micro-batches
    two_steps = router_part(input_ids, 2 * num_labels) + router_part(input_ids, 2 * num_labels)
    torch.testing.assert_close(one_step, two_steps)
    out = model(input_ids, output_router_logits=True)
    torch.testing.assert_close(one_step, out.aux_loss + out.z_loss)


# --- equivalence with dense GPT-2 -----------------------------------------------------------------------------


def dense_and_copy_upcycled(top_k=2, **overrides):
    config = tiny_gpt2_moe_config(num_experts_per_tok=top_k, normalize_top_k_weights=True, **overrides)
    dense = GPT2LMHeadModel(
        GPT2Config(**{k: v for k, v in config.to_diff_dict().items() if k in GPT2Config().to_dict()})
    )
    dense.eval()
    moe = GPT2MoeForCausalLM(config).eval()
    moe_state = moe.state_dict()
    with torch.no_grad():
        for name, tensor in dense.state_dict().items():
            if ".mlp." not in name or "transformer.h" not in name:
                moe_state[name].copy_(tensor)
                continue
            layer = name.split(".")[2]
            if int(layer) not in config.moe_layer_indices:
                moe_state[name].copy_(tensor)
                continue
            target = {"c_fc.weight": "up_proj", "c_fc.bias": "up_proj_bias", "c_proj.weight": "down_proj"}
            target["c_proj.bias"] = "down_proj_bias"
            suffix = name.split(".mlp.")[1]
            expert_param = moe_state[f"transformer.h.{layer}.mlp.experts.{target[suffix]}"]
            expert_param.copy_(tensor.expand_as(expert_param))
    return dense, moe


@pytest.mark.parametrize(("top_k", "moe_layers"), [(1, None), (2, None), (2, [1])])
def test_copy_upcycled_model_gives_the_dense_logits(top_k, moe_layers):
    dense, moe = dense_and_copy_upcycled(top_k, moe_layers=moe_layers)
    input_ids = torch.randint(2, 99, (3, 11))
    torch.testing.assert_close(moe(input_ids).logits, dense(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_no_moe_layers_has_exactly_gpt2_parameter_names():
    dense, moe = dense_and_copy_upcycled(moe_layers=[])
    assert set(moe.state_dict()) == set(dense.state_dict())


# --- experts implementations ----------------------------------------------------------------------------------


def test_set_experts_implementation_switches_kernels_with_equal_logits():
    model = tiny_model()
    input_ids = torch.randint(2, 99, (2, 9))
    logits = {}
    for implementation in EXPERTS_IMPLEMENTATIONS:
        model.set_experts_implementation(implementation)
        assert model.config._experts_implementation == implementation
        logits[implementation] = model(input_ids).logits
    for implementation in EXPERTS_IMPLEMENTATIONS:
        torch.testing.assert_close(logits[implementation], logits["eager"], rtol=1e-5, atol=1e-5)


def test_from_pretrained_accepts_experts_implementation(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert model.config._experts_implementation == "eager"


# --- dropout, noise, capacity at model level ------------------------------------------------------------------


def test_expert_dropout_acts_only_inside_experts_and_only_in_training():
    model = tiny_model(expert_dropout=0.5).train()
    input_ids = torch.randint(2, 99, (2, 9))
    first, second = (model(input_ids, output_router_logits=True) for _ in range(2))
    assert not torch.equal(first.logits, second.logits)
    # the first MoE layer's router sees attention output only: the same in both passes
    torch.testing.assert_close(first.router_logits[0], second.router_logits[0])
    without = tiny_model(expert_dropout=0.0).train()
    assert torch.equal(without(input_ids).logits, without(input_ids).logits)
    model.eval()
    assert torch.equal(model(input_ids).logits, model(input_ids).logits)


def test_capacity_at_model_level_drops_tokens_in_training_only():
    model = tiny_model(num_experts_per_tok=1, capacity_factor=0.25, min_capacity=1).train()
    input_ids = torch.randint(2, 99, (2, 16))
    model(input_ids)
    dropped = sum(block.mlp.dropped_tokens_per_expert.sum().item() for block in model.transformer.h)
    assert dropped > 0
    model.eval()
    for block in model.transformer.h:
        block.mlp.reset_counters()
    model(input_ids)
    assert sum(block.mlp.dropped_tokens_per_expert.sum().item() for block in model.transformer.h) == 0


def test_gradient_checkpointing_gives_the_same_gradients_and_counts_once():
    plain = tiny_model().train()
    checkpointed = tiny_model().train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    input_ids = torch.randint(2, 99, (2, 9))
    for model in (plain, checkpointed):
        model(input_ids, labels=input_ids).loss.backward()
    for (name, p1), (_, p2) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-6, msg=name)
    for b1, b2 in zip(plain.transformer.h, checkpointed.transformer.h, strict=True):
        assert torch.equal(b1.mlp.routed_tokens_per_expert, b2.mlp.routed_tokens_per_expert)
        assert b2.mlp.num_forwards.item() == 1


def test_reentrant_checkpointing_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="use_reentrant"):
        tiny_model().activation_checkpointing_enable({"use_reentrant": True})


# --- generation, pipeline, sequence classification ------------------------------------------------------------


def test_generate_with_and_without_cache_agree():
    model = tiny_model()
    prompt = torch.randint(2, 99, (2, 4))
    mask = torch.ones_like(prompt)
    cached = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    beams = model.generate(prompt, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False)
    assert beams.shape[0] == 2 and beams.shape[1] <= 9
    torch.manual_seed(0)
    sampled = model.generate(prompt, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=10)
    assert sampled.shape == (2, 9)


def test_text_generation_pipeline():
    generator = pipeline("text-generation", model=tiny_model(), tokenizer=tiny_word_tokenizer())
    result = generator("w5 w6 w7", max_new_tokens=4, do_sample=False)
    assert result[0]["generated_text"].startswith("w5 w6 w7")


def test_sequence_classification_pools_the_last_real_token_and_adds_router_losses():
    config = tiny_gpt2_moe_config(num_labels=3, router_aux_loss_coef=0.5)
    model = GPT2MoeForSequenceClassification(config).eval()
    input_ids = torch.tensor([[5, 6, 7, 1, 1], [8, 9, 10, 11, 12]])
    labels = torch.tensor([0, 2])
    out = model(input_ids, attention_mask=(input_ids != 1).long(), labels=labels)
    assert out.logits.shape == (2, 3)
    alone = model(input_ids[:1, :3])
    torch.testing.assert_close(out.logits[0], alone.logits[0], rtol=1e-5, atol=1e-5)
    ce = torch.nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, ce + 0.5 * out.aux_loss + config.router_z_loss_coef * out.z_loss)


# --- Auto classes and save/load -------------------------------------------------------------------------------


def test_auto_classes_build_the_moe_family():
    config = tiny_gpt2_moe_config()
    assert isinstance(AutoConfig.for_model("gpt2_moe"), GPT2MoeConfig)
    assert isinstance(AutoModel.from_config(config), GPT2MoeModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), GPT2MoeForCausalLM)
    assert isinstance(AutoModelForSequenceClassification.from_config(config), GPT2MoeForSequenceClassification)


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model(router_type="noisy_topk", moe_layers=[0], capacity_factor=1.5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GPT2MoeForCausalLM)
    ignored = {"_name_or_path"}
    saved, reloaded = model.config.to_dict(), loaded.config.to_dict()
    assert {k: v for k, v in reloaded.items() if k not in ignored} == {
        k: v for k, v in saved.items() if k not in ignored
    }
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    input_ids = torch.randint(2, 99, (2, 6))
    assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)


def test_import_registers_idempotently():
    hf_moe.register_auto_classes()
    assert AutoConfig.for_model("gpt2_moe").__class__ is GPT2MoeConfig


def test_experts_implementation_is_settable_after_a_dense_gpt2_was_built():
    """transformers caches `_can_set_experts_implementation` on classes; a dense parent's False must not leak."""
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=99))
    model = tiny_model()
    assert model.config._experts_implementation == AUTO_EXPERTS_IMPLEMENTATION
    model.set_experts_implementation("batched_mm")
    assert model.config._experts_implementation == "batched_mm"
