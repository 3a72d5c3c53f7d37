"""Tiny checkpoints for the multi-process tests, saved once per session on one process."""

from __future__ import annotations

import pytest
import torch

import hf_moe
from tests.conftest import tiny_gpt2_moe_config


def tiny_t5_config(**overrides) -> hf_moe.T5MoeConfig:
    fields = dict(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return hf_moe.T5MoeConfig(**{**fields, **overrides})


# GPT-2 with capacity (token dropping in training) and T5 v1.1 (gated experts): both under EP. A wide router init
# keeps top-k choices away from ties: with the default near-uniform routing, the 1e-7 summation-order differences
# of FSDP's gradient reduction flip near-tied expert choices within a few steps, and the runs part for a reason
# that has nothing to do with expert parallelism (FSDP alone, ep_size=1, parts the same way).
FAMILY_CONFIGS = {
    "gpt2": lambda **kw: tiny_gpt2_moe_config(
        **{"capacity_factor": 1.0, "min_capacity": 1, "router_init_std": 1.0, **kw}
    ),
    "t5": lambda **kw: tiny_t5_config(**{"feed_forward_proj": "gated-gelu", "router_init_std": 1.0, **kw}),
}


def save_tiny(family: str, folder, **overrides) -> str:
    torch.manual_seed(0)
    config = FAMILY_CONFIGS[family](**overrides)
    model_class = hf_moe.GPT2MoeForCausalLM if family == "gpt2" else hf_moe.T5MoeForConditionalGeneration
    model_class(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(params=["gpt2", "t5"])
def family(request) -> str:
    return request.param
