"""moefy with shared experts: each shared expert starts as a copy of the dense FFN, the layer's output is
N/(N+1) * dense + 1/(N+1) * (the same conversion without shared experts), so it stays function-preserving wherever that
conversion is; both families, with and without the shared-expert gate."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from hf_moe import dense_from_moe, mixture_of_students
from hf_moe.conversion import moefy
from hf_moe.modeling.moe_parts import moe_blocks

from .test_moefy import INPUT_IDS, dense_gpt2
from .tiny_dense import T5_FIELDS, T5_INPUTS, T5_KINDS


@pytest.mark.parametrize("num_shared, gate", [(1, False), (2, False), (1, True), (3, True)])
def test_copy_upcycling_with_shared_experts_preserves_the_dense_logits(num_shared, gate):
    dense = dense_gpt2()
    moe = moefy(dense, num_experts=4, top_k=2, num_shared_experts=num_shared, shared_expert_gate=gate).eval()
    block = moe.transformer.h[0].mlp
    assert block.shared_experts.up_proj.shape == (32, num_shared * 64)
    torch.testing.assert_close(moe(INPUT_IDS).logits, dense(INPUT_IDS).logits, rtol=1e-5, atol=1e-5)
    assert moe.moefy_report.init_options["shared_experts_share"] == pytest.approx(num_shared / (num_shared + 1))


@pytest.mark.parametrize("kind", sorted(T5_KINDS))
def test_t5_copy_upcycling_with_shared_experts_preserves_the_dense_logits(kind):
    torch.manual_seed(0)
    dense = T5ForConditionalGeneration(T5Config(**T5_FIELDS, **T5_KINDS[kind])).eval()
    moe = moefy(dense, num_experts=4, top_k=2, num_shared_experts=2, shared_expert_gate=True).eval()
    torch.testing.assert_close(moe(**T5_INPUTS).logits, dense(**T5_INPUTS).logits, rtol=1e-5, atol=1e-5)


def test_each_layer_mixes_the_dense_ffn_and_the_plain_conversion():
    # noise init is not function-preserving: the identity still holds layer by layer, with the same seed
    dense = dense_gpt2()
    plain = moefy(dense, num_experts=4, top_k=2, init="noise", noise_scale=0.5, seed=3).eval()
    shared = moefy(dense, num_experts=4, top_k=2, init="noise", noise_scale=0.5, seed=3, num_shared_experts=2).eval()
    hidden = torch.randn(2, 5, 32)
    for (name, plain_block), (_, shared_block), dense_layer in zip(
        moe_blocks(plain), moe_blocks(shared), dense.transformer.h, strict=True
    ):
        with torch.no_grad():
            dense_mlp = dense_layer.mlp.eval()(hidden)
            expected = 2 / 3 * dense_mlp + 1 / 3 * plain_block(hidden)
            torch.testing.assert_close(shared_block(hidden), expected, rtol=1e-5, atol=1e-5, msg=name)
            assert not torch.allclose(plain_block(hidden), dense_mlp, atol=1e-3)  # the noise really changed it


def test_shared_experts_of_another_width_are_refused_with_the_width_to_use():
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=64"):
        moefy(dense_gpt2(), num_experts=4, top_k=2, num_shared_experts=1, shared_expert_intermediate_size=32)
    # split experts are narrower (64 / 4): the shared experts' default width follows them, so it must be given
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=64"):
        moefy(dense_gpt2(), num_experts=4, top_k=4, init="split", num_shared_experts=1)
    moe = moefy(
        dense_gpt2(), num_experts=4, top_k=4, init="split", unit_combine_weights=True, num_shared_experts=1,
        shared_expert_intermediate_size=64,
    ).eval()  # fmt: skip
    torch.testing.assert_close(moe(INPUT_IDS).logits, dense_gpt2()(INPUT_IDS).logits, rtol=1e-5, atol=1e-5)


def test_dense_from_moe_refuses_shared_experts_and_mixture_of_students_keeps_them():
    moe = moefy(dense_gpt2(), num_experts=4, top_k=2, num_shared_experts=1, seed=1).eval()
    with pytest.raises(ValueError, match="cannot fold 1 shared experts"):
        dense_from_moe(moe)
    student = mixture_of_students(moe, "all", None).eval()
    torch.testing.assert_close(student(INPUT_IDS).logits, moe(INPUT_IDS).logits)
    smaller = mixture_of_students(moe, [2], 2)  # teacher layer 2 only, 2 of its 4 experts; its shared experts whole
    assert smaller.config.num_shared_experts == 1
    torch.testing.assert_close(
        smaller.transformer.h[0].mlp.shared_experts.up_proj, moe.transformer.h[2].mlp.shared_experts.up_proj
    )


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_residual_moe_upcycling_mixes_half_dense_half_routed(family):
    # top-1 with weight 1 (normalized): the copied expert is the dense FFN, so the even mix is the dense model
    if family == "gpt2":
        dense, inputs = dense_gpt2(), {"input_ids": INPUT_IDS}
    else:
        torch.manual_seed(0)
        dense, inputs = T5ForConditionalGeneration(T5Config(**T5_FIELDS, **T5_KINDS["v1.1"])).eval(), T5_INPUTS
    options = dict(num_experts=4, top_k=1, residual_moe=True)
    moe = moefy(dense, normalize_top_k_weights=True, **options).eval()
    torch.testing.assert_close(moe(**inputs).logits, dense(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert moe.moefy_report.init_options["shared_experts_share"] == 0.5
    with pytest.raises(ValueError, match="cannot fold Residual-MoE's dense MLP"):
        dense_from_moe(moe)
    if family == "gpt2":
        # Switch's raw top-1 probability: the routed half is p * dense(x), layer by layer, as without the MLP
        plain = moefy(dense, seed=2, **{**options, "residual_moe": False}).eval()
        residual = moefy(dense, seed=2, **options).eval()
        hidden = torch.randn(2, 5, 32)
        for plain_block, residual_block, layer in zip(
            (b for _, b in moe_blocks(plain)), (b for _, b in moe_blocks(residual)), dense.transformer.h, strict=True
        ):
            with torch.no_grad():
                expected = 0.5 * layer.mlp(hidden) + 0.5 * plain_block(hidden)
                torch.testing.assert_close(residual_block(hidden), expected, rtol=1e-5, atol=1e-5)
