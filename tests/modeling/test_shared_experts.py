"""Shared experts (DeepSeekMoE, Qwen2-MoE): always-active FFNs beside the routed experts, optionally gated, in both
families: the block with its routed experts zeroed equals the shared FFN (built independently from transformers'
own dense FFN classes), the gate scales it per token, counts, config checks, save / load and remote code."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.t5.modeling_t5 import T5Config, T5DenseActDense, T5DenseGatedActDense

import hf_moe
from tests.conftest import tiny_gpt2_moe_config
from tests.modeling.test_hub_portability import load_without_hf_moe


def _t5_config(**overrides):
    fields = dict(
        vocab_size=99, d_model=16, d_ff=32, d_kv=4, num_heads=2, num_layers=2, num_experts=4, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    fields.update(overrides)
    return hf_moe.T5MoeConfig(**fields)


def _zero_routed_experts(block):
    with torch.no_grad():
        for name, param in block.experts.named_parameters():
            if name.startswith("down_proj"):
                param.zero_()


def _gpt2_reference_ffn(shared, config):
    # transformers' GPT2MLP of the shared experts' summed width, holding their weights (Conv1D layout, as ours)
    width = config.shared_experts_intermediate_size
    mlp = GPT2MLP(width, GPT2Config(n_embd=config.n_embd, activation_function=config.activation_function)).eval()
    with torch.no_grad():
        mlp.c_fc.weight.copy_(shared.up_proj)
        mlp.c_fc.bias.copy_(shared.up_proj_bias)
        mlp.c_proj.weight.copy_(shared.down_proj)
        mlp.c_proj.bias.copy_(shared.down_proj_bias)
    return mlp


def _t5_reference_ffn(shared, config):
    width = config.shared_experts_intermediate_size
    dense_config = T5Config(
        d_model=config.d_model, d_ff=width, dropout_rate=0.0, feed_forward_proj=config.feed_forward_proj
    )
    with torch.no_grad():
        if config.is_gated_act:
            ffn = T5DenseGatedActDense(dense_config).eval()
            gate, up = shared.gate_up_proj.chunk(2, dim=0)  # (out, in) rows: [gate; up]
            ffn.wi_0.weight.copy_(gate)
            ffn.wi_1.weight.copy_(up)
        else:
            ffn = T5DenseActDense(dense_config).eval()
            ffn.wi.weight.copy_(shared.up_proj)
        ffn.wo.weight.copy_(shared.down_proj)
    return ffn


@pytest.mark.parametrize("num_shared, width", [(1, None), (2, None), (3, 24)])
def test_gpt2_block_with_routed_experts_zeroed_is_the_shared_ffn(num_shared, width):
    config = tiny_gpt2_moe_config(num_shared_experts=num_shared, shared_expert_intermediate_size=width)
    block = hf_moe.GPT2MoeForCausalLM(config).eval().transformer.h[0].mlp
    assert block.shared_experts.up_proj.shape == (32, num_shared * (width or 64))
    _zero_routed_experts(block)
    hidden = torch.randn(2, 5, 32)
    reference = _gpt2_reference_ffn(block.shared_experts, config)
    torch.testing.assert_close(block(hidden), reference(hidden), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_t5_block_with_routed_experts_zeroed_is_the_shared_ffn(feed_forward_proj):
    config = _t5_config(num_shared_experts=2, feed_forward_proj=feed_forward_proj)
    model = hf_moe.T5MoeForConditionalGeneration(config).eval()
    block = model.encoder.block[0].layer[-1].DenseReluDense
    _zero_routed_experts(block)
    hidden = torch.randn(2, 5, 16)
    reference = _t5_reference_ffn(block.shared_experts, config)
    torch.testing.assert_close(block(hidden), reference(hidden), rtol=1e-5, atol=1e-6)


def test_the_routed_output_is_added_to_the_shared_one():
    config = tiny_gpt2_moe_config(num_shared_experts=1)
    block = hf_moe.GPT2MoeForCausalLM(config).eval().transformer.h[0].mlp
    hidden = torch.randn(2, 5, 32)
    with torch.no_grad():
        both = block(hidden)
        shared = block.shared_experts(hidden.reshape(-1, 32)).view_as(hidden)
        block.shared_experts = None
        routed = block(hidden)
    torch.testing.assert_close(both, routed + shared)
    assert shared.abs().sum() > 0 and routed.abs().sum() > 0


def test_shared_expert_gate_scales_per_token_and_starts_at_one_half():
    config = tiny_gpt2_moe_config(num_shared_experts=1, shared_expert_gate=True)
    block = hf_moe.GPT2MoeForCausalLM(config).eval().transformer.h[0].mlp
    shared = block.shared_experts
    _zero_routed_experts(block)
    hidden = torch.randn(2, 5, 32)
    reference = _gpt2_reference_ffn(shared, config)
    assert torch.equal(shared.gate.weight, torch.zeros(1, 32))
    torch.testing.assert_close(block(hidden), 0.5 * reference(hidden), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        shared.gate.weight.normal_()
    gate = torch.sigmoid(hidden @ shared.gate.weight.t())  # (B, S, 1): one scale per token
    assert gate.std() > 0.05
    torch.testing.assert_close(block(hidden), gate * reference(hidden), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_shared_experts=2),
        dict(num_shared_experts=1, shared_expert_gate=True, shared_expert_intermediate_size=24, moe_layers=[1]),
    ],
)
def test_gpt2_parameter_counts_hold_the_shared_experts(overrides):
    config = tiny_gpt2_moe_config(**overrides)
    model = hf_moe.GPT2MoeForCausalLM(config)
    counts = config.parameter_counts()
    shared = sum(p.numel() for name, p in model.named_parameters() if ".shared_experts." in name)
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert counts["total"] == model.num_parameters()
    assert counts["shared_experts"] == shared > 0 and counts["experts"] == routed
    # every shared-expert parameter is active; of the routed ones, k of E
    per_layer = routed // len(config.moe_layer_indices)
    assert counts["active"] == counts["total"] - routed + per_layer * 2 // 4 * len(config.moe_layer_indices)


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_t5_parameter_counts_hold_the_shared_experts(feed_forward_proj):
    config = _t5_config(num_shared_experts=2, shared_expert_gate=True, feed_forward_proj=feed_forward_proj)
    model = hf_moe.T5MoeForConditionalGeneration(config)
    counts = config.parameter_counts()
    shared = sum(p.numel() for name, p in model.named_parameters() if ".shared_experts." in name)
    assert counts["total"] == model.num_parameters() and counts["shared_experts"] == shared > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_shared_experts=-1), "num_shared_experts must be >= 0"),
        (dict(num_shared_experts=1, shared_expert_intermediate_size=0), "shared_expert_intermediate_size must be"),
        (dict(shared_expert_gate=True), "num_shared_experts=0"),
        (dict(num_shared_experts=1, shared_expert_gate="yes"), "shared_expert_gate must be True or False"),
        (dict(num_shared_experts=1.5), "num_shared_experts must be an int"),
    ],
)
def test_bad_shared_expert_settings_are_refused(overrides, message):
    # transformers' strict configs wrap the validator's ValueError / TypeError, keeping its message
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        tiny_gpt2_moe_config(**overrides)


def test_shared_experts_train_save_and_load_with_remote_code(tmp_path):
    config = tiny_gpt2_moe_config(num_shared_experts=1, shared_expert_gate=True)
    model = hf_moe.GPT2MoeForCausalLM(config)
    ids = torch.randint(2, 99, (2, 7))
    model(ids, labels=ids).loss.backward()
    shared = model.transformer.h[0].mlp.shared_experts
    # every token trains them, the gate included
    assert shared.up_proj.grad.abs().sum() > 0 and shared.gate.weight.grad.abs().sum() > 0
    model.eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    assert (folder / "shared_experts.py").exists()
    reloaded = hf_moe.GPT2MoeForCausalLM.from_pretrained(folder).eval()
    assert reloaded.config.num_shared_experts == 1 and reloaded.config.shared_expert_gate
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    torch.save(ids, folder / "input_ids.pt")
    loaded = load_without_hf_moe(folder, "AutoModelForCausalLM", tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded["result"], model(ids).logits)


def test_optimizer_presets_treat_shared_experts_as_dense_weights():
    from hf_moe.training import apply_moe_preset, classify_moe_parameters

    model = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(num_shared_experts=1, shared_expert_gate=True))
    kinds = classify_moe_parameters(model)
    shared = [name for name in kinds if ".shared_experts." in name]
    assert shared and all(kinds[name] == "other" for name in shared)
    # every token trains them, like the dense FFN: freezing the routed experts leaves them training
    apply_moe_preset(model, "freeze_experts")
    parameters = dict(model.named_parameters())
    assert all(parameters[name].requires_grad for name in shared)
    assert not parameters["transformer.h.0.mlp.experts.up_proj"].requires_grad
