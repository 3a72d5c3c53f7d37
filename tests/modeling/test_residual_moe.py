"""Residual-MoE (DeepSpeed-MoE): a fixed dense MLP beside the routed top-1 expert, mixed per token by a learned
2-way softmax coefficient. With the coefficient fixed to (1, 0) the layer is the dense MLP, with (0, 1) the plain
routed layer; counts, config checks, training and save / load."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

import hf_moe
from tests.conftest import tiny_gpt2_moe_config
from tests.modeling.test_hub_portability import load_without_hf_moe
from tests.modeling.test_shared_experts import _gpt2_reference_ffn, _t5_config, _t5_reference_ffn


def _fix_coefficient(block, dense_weight: float, routed_weight: float):
    # softmax((100, -100)) is (1, 0) to float32 precision: e^-200 underflows
    logits = torch.tensor([dense_weight, routed_weight]) * 200 - 100
    with torch.no_grad():
        block.residual_coefficient.weight.zero_()
        block.residual_coefficient.bias.copy_(logits)


def _gpt2_block(**overrides):
    config = tiny_gpt2_moe_config(residual_moe=True, num_experts_per_tok=1, **overrides)
    return hf_moe.GPT2MoeForCausalLM(config).eval().transformer.h[0].mlp, config


def test_coefficient_one_zero_gives_the_dense_mlp_and_zero_one_the_routed_layer():
    block, config = _gpt2_block()
    hidden = torch.randn(2, 5, 32)
    _fix_coefficient(block, 1.0, 0.0)
    torch.testing.assert_close(block(hidden), _gpt2_reference_ffn(block.shared_experts, config)(hidden))
    _fix_coefficient(block, 0.0, 1.0)
    with torch.no_grad():
        mixed = block(hidden)
        block.shared_experts, block.residual_coefficient = None, None  # the plain routed layer
        routed = block(hidden)
    torch.testing.assert_close(mixed, routed)


def test_the_coefficient_starts_even_and_mixes_per_token():
    block, config = _gpt2_block()
    assert torch.equal(block.residual_coefficient.weight, torch.zeros(2, 32))
    hidden = torch.randn(2, 5, 32)
    with torch.no_grad():
        block.residual_coefficient.weight.normal_()
        coefficient = torch.softmax(block.residual_coefficient(hidden), dim=-1)  # (B, S, 2)
        dense = _gpt2_reference_ffn(block.shared_experts, config)(hidden)
        both = block(hidden)
        block.shared_experts, block.residual_coefficient = None, None
        routed = block(hidden)
    assert coefficient[..., 0].std() > 0.05  # really per token
    torch.testing.assert_close(both, coefficient[..., :1] * dense + coefficient[..., 1:] * routed)


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_t5_coefficient_one_zero_gives_the_dense_mlp(feed_forward_proj):
    config = _t5_config(residual_moe=True, num_experts_per_tok=1, feed_forward_proj=feed_forward_proj)
    block = hf_moe.T5MoeForConditionalGeneration(config).eval().decoder.block[1].layer[-1].DenseReluDense
    _fix_coefficient(block, 1.0, 0.0)
    hidden = torch.randn(2, 5, 16)
    torch.testing.assert_close(block(hidden), _t5_reference_ffn(block.shared_experts, config)(hidden))
    assert config.parameter_counts()["total"] == hf_moe.T5MoeForConditionalGeneration(config).num_parameters()


def test_parameter_counts_and_training():
    config = tiny_gpt2_moe_config(residual_moe=True, num_experts_per_tok=1, shared_expert_intermediate_size=48)
    model = hf_moe.GPT2MoeForCausalLM(config)
    counts = config.parameter_counts()
    assert counts["total"] == model.num_parameters()
    assert counts["shared_experts"] == 2 * (2 * 32 * 48 + 48 + 32)  # the dense MLP of each of the 2 MoE layers
    ids = torch.randint(2, 99, (2, 7))
    model(ids, labels=ids).loss.backward()
    block = model.transformer.h[1].mlp
    # the coefficient learns from the start (its gradient is not zero at the even mix), and so does the MLP
    assert block.residual_coefficient.weight.grad.abs().sum() > 0
    assert block.shared_experts.up_proj.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(residual_moe=True, num_experts_per_tok=2), "set num_experts_per_tok=1"),
        (dict(residual_moe=True, num_experts_per_tok=1, num_shared_experts=1), "cannot be combined"),
        (dict(residual_moe="yes", num_experts_per_tok=1), "residual_moe must be True or False"),
    ],
)
def test_bad_residual_settings_are_refused(overrides, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        tiny_gpt2_moe_config(**overrides)


def test_residual_moe_saves_and_loads_with_remote_code(tmp_path):
    model = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(residual_moe=True, num_experts_per_tok=1)).eval()
    with torch.no_grad():
        for block in (layer.mlp for layer in model.transformer.h):
            block.residual_coefficient.weight.normal_()  # not the init, so the load must really read it
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    ids = torch.randint(2, 99, (2, 7))
    reloaded = hf_moe.GPT2MoeForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    torch.save(ids, folder / "input_ids.pt")
    with torch.no_grad():
        assert torch.equal(load_without_hf_moe(folder, "AutoModelForCausalLM", tmp_path)["result"], model(ids).logits)
