"""Fresh MoE models initialize every weight they share with the dense model exactly as the dense model does."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from hf_moe import GPT2MoeConfig, GPT2MoeForCausalLM, T5MoeConfig, T5MoeForConditionalGeneration

T5_FIELDS = dict(vocab_size=99, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, decoder_start_token_id=0)
GPT2_FIELDS = dict(vocab_size=99, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_every_dense_weight_is_initialized_as_in_the_dense_model(family):
    # Registered for the Auto classes, the families count as custom code in transformers, which once made T5's
    # attention (a module without parameters of its own) keep the generic std-1.0 Linear init
    torch.manual_seed(0)
    if family == "t5":
        dense = T5ForConditionalGeneration(T5Config(**T5_FIELDS))
        moe = T5MoeForConditionalGeneration(T5MoeConfig(num_experts=4, **T5_FIELDS))
    else:
        dense = GPT2LMHeadModel(GPT2Config(**GPT2_FIELDS))
        moe = GPT2MoeForCausalLM(GPT2MoeConfig(num_experts=4, **GPT2_FIELDS))
    moe_state = moe.state_dict()
    compared = 0
    for name, weight in dense.state_dict().items():
        if name in moe_state and weight.dim() == 2 and weight.numel() >= 1024:
            assert moe_state[name].std().item() == pytest.approx(weight.std().item(), rel=0.15), name
            compared += 1
    assert compared >= 6
