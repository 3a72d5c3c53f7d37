"""moefy into WideNet (`share_blocks_across_layers=True`): each shared weight starts as the mean of the dense layers
that apply it, or as one block's; each layer keeps its own dense LayerNorms. Where the dense blocks are already equal,
the shared conversion computes what the dense model does; save / load; bad arguments."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from hf_moe import GPT2MoeForCausalLM, T5MoeForConditionalGeneration, dense_from_moe, mixture_of_students
from hf_moe.conversion import moefy

from .test_moefy import INPUT_IDS, dense_gpt2
from .tiny_dense import T5_FIELDS, T5_INPUTS, T5_KINDS


def _mean(tensors):
    return torch.stack([tensor.double() for tensor in tensors]).mean(0).float()


def test_mean_start_averages_the_dense_layers_and_keeps_each_layers_norms():
    dense = dense_gpt2()
    moe = moefy(dense, num_experts=4, top_k=2, share_blocks_across_layers=True)
    layers = dense.transformer.h
    shared = moe.transformer.h[0]
    torch.testing.assert_close(shared.attn.c_attn.weight, _mean([layer.attn.c_attn.weight for layer in layers]))
    mean_fc = _mean([layer.mlp.c_fc.weight for layer in layers])
    for expert in range(4):  # copy init: every expert is the mean dense FFN
        torch.testing.assert_close(shared.mlp.experts.up_proj[expert], mean_fc)
    for moe_layer, dense_layer in zip(moe.transformer.h, layers, strict=True):
        assert torch.equal(moe_layer.ln_1.weight, dense_layer.ln_1.weight)
        assert moe_layer.attn.c_attn.weight is shared.attn.c_attn.weight
    assert moe.moefy_report.init_options["shared_block_init"] == "mean"
    assert moe.config.parameter_counts()["total"] == moe.num_parameters()


def test_block_start_takes_one_dense_block_and_dense_mlps_from_the_first_dense_block():
    dense = dense_gpt2()
    moe = moefy(dense, num_experts=4, top_k=2, moe_layers=[1, 2], share_blocks_across_layers=True, shared_block_init=2)
    assert torch.equal(moe.transformer.h[0].attn.c_attn.weight, dense.transformer.h[2].attn.c_attn.weight)
    assert torch.equal(moe.transformer.h[1].mlp.experts.up_proj[0], dense.transformer.h[2].mlp.c_fc.weight)
    # block 0 is the only dense block: its MLP is the only one there is to take
    assert torch.equal(moe.transformer.h[0].mlp.c_fc.weight, dense.transformer.h[0].mlp.c_fc.weight)


def _equal_blocks(dense, stacks):
    # every block of each stack a copy of its block 0, except the LayerNorms, which stay different per layer
    with torch.no_grad():
        for stack in stacks:
            first = dict(stack[0].named_parameters())
            for block in stack[1:]:
                for name, param in block.named_parameters():
                    if "ln_" not in name and "layer_norm" not in name and name in first:
                        param.copy_(first[name])
    return dense


def test_a_dense_model_of_equal_blocks_keeps_its_logits():
    dense = dense_gpt2()
    _equal_blocks(dense, [dense.transformer.h])
    with torch.no_grad():
        for layer in dense.transformer.h:
            layer.ln_2.weight.uniform_(0.5, 1.5)  # per-layer norms really differ
    moe = moefy(dense, num_experts=4, top_k=2, normalize_top_k_weights=True, share_blocks_across_layers=True).eval()
    torch.testing.assert_close(moe(INPUT_IDS).logits, dense(INPUT_IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(T5_KINDS))
def test_t5_dense_model_of_equal_blocks_keeps_its_logits(kind):
    torch.manual_seed(0)
    dense = T5ForConditionalGeneration(T5Config(**T5_FIELDS, **T5_KINDS[kind])).eval()
    _equal_blocks(dense, [dense.encoder.block, dense.decoder.block])
    moe = moefy(dense, num_experts=4, top_k=2, share_blocks_across_layers=True, per_layer_router=True).eval()
    torch.testing.assert_close(moe(**T5_INPUTS).logits, dense(**T5_INPUTS).logits, rtol=1e-5, atol=1e-5)
    assert (
        moe.decoder.block[2].layer[1].EncDecAttention.q.weight
        is moe.decoder.block[0].layer[1].EncDecAttention.q.weight
    )
    assert moe.config.parameter_counts()["total"] == moe.num_parameters()


def test_shared_conversion_saves_and_loads(tmp_path):
    moe = moefy(dense_gpt2(), num_experts=4, top_k=2, share_blocks_across_layers=True).eval()
    moe.save_pretrained(tmp_path)
    reloaded = GPT2MoeForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.transformer.h[2].mlp.experts.up_proj is reloaded.transformer.h[0].mlp.experts.up_proj
    with torch.no_grad():
        assert torch.equal(reloaded(INPUT_IDS).logits, moe(INPUT_IDS).logits)


def test_t5_block_index_must_exist_in_every_stack():
    dense = T5ForConditionalGeneration(T5Config(**T5_FIELDS, **T5_KINDS["v1.0"]))  # 2 encoder, 3 decoder blocks
    with pytest.raises(ValueError, match=r"a block index in \[0, 2\)"):
        moefy(dense, num_experts=4, share_blocks_across_layers=True, shared_block_init=2)
    moe = moefy(dense, num_experts=4, share_blocks_across_layers=True, shared_block_init=1)
    assert isinstance(moe, T5MoeForConditionalGeneration)
    assert torch.equal(
        moe.encoder.block[0].layer[0].SelfAttention.q.weight, dense.encoder.block[1].layer[0].SelfAttention.q.weight
    )


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(shared_block_init=1), "needs share_blocks_across_layers=True"),
        (dict(share_blocks_across_layers=True, shared_block_init="first"), "must be 'mean' or a block index"),
        (dict(share_blocks_across_layers=True, shared_block_init=True), "must be 'mean' or a block index"),
        (dict(share_blocks_across_layers=True, router_init="hidden_prompts", expert_prompts=["a"] * 4),
         "one router serves every layer"),
    ],
)  # fmt: skip
def test_bad_shared_block_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        moefy(dense_gpt2(), num_experts=4, top_k=2, **arguments)


def test_dense_from_moe_unshares_and_a_student_keeps_the_sharing():
    moe = moefy(dense_gpt2(), num_experts=4, top_k=2, normalize_top_k_weights=True, share_blocks_across_layers=True)
    moe.eval()
    dense = dense_from_moe(moe).eval()  # every layer a copy of the shared block, its own LayerNorms
    assert dense.transformer.h[0].attn.c_attn.weight is not dense.transformer.h[2].attn.c_attn.weight
    torch.testing.assert_close(dense(INPUT_IDS).logits, moe(INPUT_IDS).logits, rtol=1e-5, atol=1e-5)
    student = mixture_of_students(moe, layers=[0, 2])
    assert student.config.share_blocks_across_layers
    assert student.transformer.h[1].mlp.experts.up_proj is student.transformer.h[0].mlp.experts.up_proj
    assert student.config.parameter_counts()["total"] == student.num_parameters()
