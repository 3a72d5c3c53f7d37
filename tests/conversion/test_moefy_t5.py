"""moefy on T5 (v1.0 relu, v1.1 gated-gelu) and mT5: function preservation, stacks, heads."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
    T5Model,
)

from hf_moe import T5MoeEncoderModel, T5MoeForConditionalGeneration, T5MoeModel
from hf_moe.conversion import moefy

from .tiny_dense import T5_FIELDS, T5_INPUTS, T5_KINDS


def dense_t5(kind="v1.0", cls=T5ForConditionalGeneration):
    torch.manual_seed(0)
    return cls(T5Config(**T5_FIELDS, **T5_KINDS[kind])).eval()


@pytest.mark.parametrize("kind", list(T5_KINDS))
@pytest.mark.parametrize(
    ("init", "options"),
    [("copy", dict(top_k=2, normalize_top_k_weights=True)), ("split", dict(top_k=4, unit_combine_weights=True))],
)
def test_function_preservation_for_both_ffn_kinds(kind, init, options):
    dense = dense_t5(kind)
    moe = moefy(dense, num_experts=4, init=init, **options).eval()
    assert isinstance(moe, T5MoeForConditionalGeneration)
    assert moe.config.is_gated_act == (kind == "v1.1")
    torch.testing.assert_close(moe(**T5_INPUTS).logits, dense(**T5_INPUTS).logits, rtol=1e-5, atol=1e-5)


def test_mt5_is_preserved_too():
    torch.manual_seed(0)
    dense = MT5ForConditionalGeneration(MT5Config(**T5_FIELDS)).eval()
    moe = moefy(dense, num_experts=2, top_k=2, normalize_top_k_weights=True).eval()
    torch.testing.assert_close(moe(**T5_INPUTS).logits, dense(**T5_INPUTS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("source", "target"), [(T5Model, T5MoeModel), (T5EncoderModel, T5MoeEncoderModel)])
def test_other_t5_heads(source, target):
    dense = dense_t5(cls=source)
    moe = moefy(dense, num_experts=2, top_k=1, normalize_top_k_weights=True).eval()
    assert type(moe) is target
    inputs = T5_INPUTS if source is T5Model else {"input_ids": T5_INPUTS["input_ids"]}
    torch.testing.assert_close(
        moe(**inputs).last_hidden_state, dense(**inputs).last_hidden_state, rtol=1e-5, atol=1e-5
    )


def test_encoder_and_decoder_layers_are_chosen_separately():
    moe = moefy(dense_t5(), num_experts=2, top_k=1, encoder_moe_layers="none", decoder_moe_layers="top:1")
    assert moe.moefy_report.moe_layers == {"encoder": [], "decoder": [2]}
    assert [block.is_moe for block in moe.encoder.block] == [False, False]
    assert [block.is_moe for block in moe.decoder.block] == [False, False, True]
    shared = moefy(dense_t5(), num_experts=2, top_k=1, moe_layers="bottom:1")
    assert shared.moefy_report.moe_layers == {"encoder": [0], "decoder": [0]}
    # an empty list means no layer, not "fall back to moe_layers"
    empty = moefy(dense_t5(), num_experts=2, top_k=1, moe_layers="all", encoder_moe_layers=[])
    assert empty.moefy_report.moe_layers == {"encoder": [], "decoder": [0, 1, 2]}


def test_routers_of_both_stacks_learn_after_upcycling():
    moe = moefy(dense_t5("v1.1"), num_experts=4, top_k=2).train()
    labels = torch.randint(2, 99, (2, 5))
    moe(input_ids=T5_INPUTS["input_ids"], labels=labels).loss.backward()
    routers = [m for name, m in moe.named_modules() if name.endswith("router")]
    assert len(routers) == 5
    assert all(router.weight.grad.abs().sum() > 0 for router in routers)
