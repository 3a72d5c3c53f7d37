"""dense_from_moe: the inverse of moefy gives back the dense model (weights and logits), per family, head and layer
choice; the FFN is the chosen expert or the experts' mean in the dense layout, the output scale folded in; models it
cannot invert faithfully are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)

import hf_moe
from hf_moe import dense_from_moe, moefy
from tests.conftest import tiny_gpt2_moe_config

from .tiny_dense import INPUT_IDS, T5_FIELDS, T5_INPUTS, T5_KINDS

GPT2_FIELDS = dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=3, n_head=4, n_inner=64, pad_token_id=1)


def dense_gpt2(cls=GPT2LMHeadModel):
    torch.manual_seed(0)
    return cls(GPT2Config(**GPT2_FIELDS)).eval()


def dense_t5(kind="v1.0", cls=T5ForConditionalGeneration):
    torch.manual_seed(0)
    return cls(T5Config(**T5_FIELDS, **T5_KINDS[kind])).eval()


def assert_same_weights(got, expected):
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert set(got_state) == set(expected_state)
    for name, tensor in expected_state.items():
        assert torch.equal(got_state[name], tensor), name


@pytest.mark.parametrize("layers", ["all", "every_other"])
@pytest.mark.parametrize("ffn", ["mean", 2])
def test_gpt2_copy_upcycled_moe_gives_back_the_dense_model(layers, ffn):
    dense = dense_gpt2()
    # 3 experts: a mean of copies that is exact only when taken in enough precision
    moe = moefy(dense, num_experts=3, top_k=2, normalize_top_k_weights=True, moe_layers=layers).eval()
    back = dense_from_moe(moe, ffn=ffn)
    assert type(back) is GPT2LMHeadModel
    assert back.config.model_type == "gpt2" and back.config.n_inner == 64
    assert not any(name in back.config.to_dict() for name in ("num_local_experts", "moe_layers", "router_type"))
    assert_same_weights(back, dense)
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()  # still tied
    assert not back.training
    assert dense.loss_type is None and back.loss_type == "ForCausalLM"  # the MoE's loss, which GPT-2's name lacks
    torch.testing.assert_close(back(INPUT_IDS).logits, dense(INPUT_IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(T5_KINDS))
@pytest.mark.parametrize("layers", ["all", "every_other"])
def test_t5_copy_upcycled_moe_gives_back_the_dense_model(kind, layers):
    dense = dense_t5(kind)
    moe = moefy(dense, num_experts=4, top_k=2, normalize_top_k_weights=True, moe_layers=layers).eval()
    for ffn in ("mean", 1):
        back = dense_from_moe(moe, ffn=ffn)
        assert type(back) is T5ForConditionalGeneration
        assert back.config.scale_decoder_outputs == dense.config.scale_decoder_outputs
        assert back.config.is_gated_act == (kind == "v1.1")
        assert_same_weights(back, dense)
        torch.testing.assert_close(back(**T5_INPUTS).logits, dense(**T5_INPUTS).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("dense_class", "options"),
    [
        # raw softmax weights: the experts were scaled by E / K = 2, the fold multiplies by K / E
        (GPT2LMHeadModel, dict(top_k=2, normalize_top_k_weights=False, scale_weights=True)),
        # unit weights: scaled by 1 / K, folded by K (GPT-2's output bias is weighted like the projection)
        (GPT2LMHeadModel, dict(top_k=2, unit_combine_weights=True, scale_weights=True)),
        (T5ForConditionalGeneration, dict(top_k=1, normalize_top_k_weights=False, scale_weights=True)),
        (GPT2LMHeadModel, dict(top_k=1, router_type="hash")),
    ],
)
def test_the_output_scale_is_folded_back(dense_class, options):
    dense = dense_gpt2() if dense_class is GPT2LMHeadModel else dense_t5()
    moe = moefy(dense, num_experts=4, **options).eval()
    back = dense_from_moe(moe, ffn=3)
    for name, tensor in dense.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=1e-6, atol=0, msg=name)
    inputs = dict(input_ids=INPUT_IDS) if dense_class is GPT2LMHeadModel else T5_INPUTS
    torch.testing.assert_close(back(**inputs).logits, dense(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("dense_class", "moe_class"),
    [
        (GPT2Model, hf_moe.GPT2MoeModel),
        (GPT2ForSequenceClassification, hf_moe.GPT2MoeForSequenceClassification),
        (T5EncoderModel, hf_moe.T5MoeEncoderModel),
    ],
)
def test_each_head_maps_back_to_its_dense_head(dense_class, moe_class):
    dense = dense_gpt2(dense_class) if dense_class.__name__.startswith("GPT2") else dense_t5(cls=dense_class)
    moe = moefy(dense, num_experts=2, top_k=1, normalize_top_k_weights=True)
    assert type(moe) is moe_class
    back = dense_from_moe(moe)
    assert type(back) is dense_class
    assert_same_weights(back, dense)


def test_an_moe_made_from_mt5_becomes_a_t5_that_computes_what_the_mt5_did():
    torch.manual_seed(0)
    mt5 = MT5ForConditionalGeneration(MT5Config(**T5_FIELDS)).eval()
    back = dense_from_moe(moefy(mt5, num_experts=2, top_k=2, normalize_top_k_weights=True))
    assert type(back) is T5ForConditionalGeneration and back.config.scale_decoder_outputs is False
    torch.testing.assert_close(back(**T5_INPUTS).logits, mt5(**T5_INPUTS).logits, rtol=0, atol=0)


def gpt2_noisy_moe():
    return moefy(dense_gpt2(), num_experts=4, top_k=2, init="noise", noise_scale=0.5, moe_layers="every_other").eval()


def test_a_chosen_expert_is_that_experts_function():
    """The layout check by function, not by tensor names: the dense layer's MLP computes what the experts module
    computes when every token goes to expert i with weight 1."""
    moe = gpt2_noisy_moe()
    hidden_TD = torch.randn(10, 32)
    for expert in (0, 3):
        back = dense_from_moe(moe, ffn=expert)
        experts = moe.transformer.h[1].mlp.experts
        route_TK = torch.full((10, 1), expert)
        expected_TD = experts(hidden_TD, route_TK, torch.ones(10, 1))
        torch.testing.assert_close(back.transformer.h[1].mlp(hidden_TD), expected_TD, rtol=1e-6, atol=1e-6)
        # the layer that stayed dense is copied as it is
        assert torch.equal(back.transformer.h[0].mlp.c_fc.weight, moe.transformer.h[0].mlp.c_fc.weight)


def test_t5_gated_experts_split_into_wi_0_and_wi_1_and_the_mean_is_the_mean():
    moe = moefy(dense_t5("v1.1"), num_experts=4, top_k=2, init="noise", noise_scale=0.5).eval()
    block = moe.decoder.block[2].layer[2].DenseReluDense
    hidden_TD = torch.randn(6, 32)
    back = dense_from_moe(moe, ffn=1)
    expected_TD = block.experts(hidden_TD, torch.full((6, 1), 1), torch.ones(6, 1))
    dense_ffn = back.decoder.block[2].layer[2].DenseReluDense
    torch.testing.assert_close(dense_ffn(hidden_TD), expected_TD, rtol=1e-6, atol=1e-6)
    mean = dense_from_moe(moe, ffn="mean").decoder.block[2].layer[2].DenseReluDense
    gate_up = block.experts.gate_up_proj.double()  # (E, 2F, D) = [wi_0; wi_1]
    torch.testing.assert_close(mean.wi_0.weight, gate_up[:, :64].mean(0).float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(mean.wi_1.weight, gate_up[:, 64:].mean(0).float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(mean.wo.weight, block.experts.down_proj.double().mean(0).float(), rtol=0, atol=1e-7)


def test_the_moe_model_is_untouched_and_the_dense_model_owns_its_weights():
    moe = gpt2_noisy_moe().train()
    before = {name: tensor.clone() for name, tensor in moe.state_dict().items()}
    back = dense_from_moe(moe)
    assert back.training
    for name, tensor in moe.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert back.transformer.wte.weight.data_ptr() != moe.transformer.wte.weight.data_ptr()


def test_a_saved_and_reloaded_moe_converts_too(tmp_path):
    dense = dense_gpt2()
    moefy(dense, num_experts=2, top_k=2, normalize_top_k_weights=True).save_pretrained(tmp_path)
    reloaded = hf_moe.GPT2MoeForCausalLM.from_pretrained(tmp_path)
    assert_same_weights(dense_from_moe(reloaded), dense)


@pytest.mark.parametrize("ffn", [4, -1, "median", True, 1.0, None])
def test_a_bad_ffn_choice_is_named(ffn):
    with pytest.raises(ValueError, match=r"ffn must be 'mean' or an expert index in \[0, 4\)"):
        dense_from_moe(gpt2_noisy_moe(), ffn=ffn)


@pytest.mark.parametrize(
    "options",
    [
        dict(init="split", top_k=4, unit_combine_weights=True),
        dict(init="granular", granularity=2, top_k=2),
    ],
)
def test_experts_that_are_parts_of_an_ffn_are_refused(options):
    moe = moefy(dense_gpt2(), num_experts=4, **options)
    with pytest.raises(ValueError, match="moe_intermediate_size=(16|32) .*dense FFN 64"):
        dense_from_moe(moe)


@pytest.mark.parametrize(
    "fields",
    [
        dict(router_type="base", num_experts_per_tok=1),
        dict(router_type="expert_choice", capacity_factor=2.0, allow_noncausal_routing=True),
        dict(router_type="dense_to_sparse"),
    ],
)
def test_routers_without_a_dense_equivalent_are_refused(fields):
    moe = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(**fields))
    with pytest.raises(ValueError, match=rf"router_type='{fields['router_type']}'.*'topk', 'noisy_topk'.*'hash'"):
        dense_from_moe(moe)


def test_a_model_that_is_no_hf_moe_model_is_refused():
    with pytest.raises(ValueError, match="converts the hf_moe MoE models GPT2MoeForCausalLM.*got a GPT2LMHeadModel"):
        dense_from_moe(dense_gpt2())
