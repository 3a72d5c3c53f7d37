"""moefy with a per-layer expert list (PR-MoE pyramid): each layer gets its own count of copies, still
function-preserving; recipes that build every layer alike are refused."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import T5Config, T5ForConditionalGeneration

from hf_moe.conversion import moefy
from hf_moe.modeling import moe_blocks

from .test_moefy import INPUT_IDS, dense_gpt2
from .tiny_dense import T5_FIELDS, T5_INPUTS, T5_KINDS


def test_gpt2_pyramid_upcycling_preserves_the_dense_logits():
    dense = dense_gpt2()  # 3 layers
    moe = moefy(dense, num_experts=[2, 4, 8], top_k=2, init="noise", noise_scale=0.0).eval()
    assert [block.experts.down_proj.shape[0] for _, block in moe_blocks(moe)] == [2, 4, 8]
    assert moe.config.num_experts_per_layer == [2, 4, 8] and moe.moefy_report.num_experts == [2, 4, 8]
    torch.testing.assert_close(moe(INPUT_IDS).logits, dense(INPUT_IDS).logits, rtol=1e-5, atol=1e-5)
    assert moe.moefy_report.parameters["total"] == moe.num_parameters()


def test_t5_pyramid_of_chosen_layers():
    torch.manual_seed(0)
    dense = T5ForConditionalGeneration(T5Config(**T5_FIELDS, **T5_KINDS["v1.1"])).eval()
    # encoder layer 1, decoder layers 0 and 2: three MoE layers in module order
    moe = moefy(dense, num_experts=[2, 4, 6], top_k=2, encoder_moe_layers=[1], decoder_moe_layers=[0, 2]).eval()
    assert [block.num_experts for _, block in moe_blocks(moe)] == [2, 4, 6]
    torch.testing.assert_close(moe(**T5_INPUTS).logits, dense(**T5_INPUTS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_experts=[2, 4]), "has 2 entries, but the model has 3 MoE layers"),
        (dict(num_experts=[2, 4, 0]), "a list of ints >= 1"),
        (dict(num_experts=[2, 4, 4], init="split"), "init in"),
        (dict(num_experts=[2, 4, 4], router_type="hash", top_k=1, hash_kind="clustered"), "hash_kind in"),
    ],
)
def test_bad_pyramid_conversions_are_refused(options, message):
    # the config's own checks come wrapped by transformers' strict configs
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=message):
        moefy(dense_gpt2(), **{"top_k": 2, **options})


def test_dense_from_moe_of_a_pyramid_folds_each_layers_own_combine_weight():
    from hf_moe import dense_from_moe

    dense = dense_gpt2()
    # normalized weights: copies give back the dense model bit for bit
    back = dense_from_moe(moefy(dense, num_experts=[2, 4, 8], top_k=2, normalize_top_k_weights=True))
    for original, recovered in zip(dense.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(original, recovered)
    # raw softmax weights: at a uniform router each layer gives K / E of its FFN, E the layer's own count
    back = dense_from_moe(moefy(dense, num_experts=[2, 4, 8], top_k=2, normalize_top_k_weights=False))
    for layer, experts in enumerate([2, 4, 8]):
        scale = 2 / experts
        original, recovered = dense.transformer.h[layer].mlp.c_proj, back.transformer.h[layer].mlp.c_proj
        torch.testing.assert_close(recovered.weight, scale * original.weight)
    with pytest.raises(ValueError, match=r"an expert index in \[0, 2\) \(the fewest of num_experts_per_layer=2\)"):
        dense_from_moe(moefy(dense, num_experts=[2, 4, 8], top_k=2), ffn=3)
