"""Routers and capacity: properties of the routing decisions."""

from __future__ import annotations

import pytest
import torch

from hf_moe.modeling.routing import (
    ROUTERS,
    NoisyTopKRouter,
    TopKRouter,
    build_router,
    capacity_keep_mask,
    expert_capacity,
)
from tests.conftest import tiny_gpt2_moe_config


def make_router(**overrides):
    config = tiny_gpt2_moe_config(**overrides)
    router = build_router(config, hidden_size=32)
    torch.nn.init.normal_(router.weight, std=0.5)
    return router


def test_registry_builds_each_router_by_name():
    assert set(ROUTERS) == {"topk", "noisy_topk"}
    assert isinstance(make_router(router_type="topk"), TopKRouter)
    assert isinstance(make_router(router_type="noisy_topk"), NoisyTopKRouter)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_selection_and_weights(top_k):
    router = make_router(num_experts_per_tok=top_k).eval()
    hidden_TD = torch.randn(20, 32)
    out = router(hidden_TD)
    probs_TE = torch.softmax(hidden_TD @ router.weight.t(), dim=-1)
    expected_probs, expected_index = probs_TE.topk(top_k, dim=-1)
    assert torch.equal(out.top_k_index_TK, expected_index)
    if top_k == 1:  # Switch: the raw probability is the combine weight
        torch.testing.assert_close(out.top_k_weights_TK, expected_probs)
    else:  # GShard / Mixtral: renormalized
        torch.testing.assert_close(out.top_k_weights_TK.sum(-1), torch.ones(20))
    assert out.kept_TK is None  # dropless by default


def test_explicit_normalization_overrides_the_default():
    router = make_router(num_experts_per_tok=1, normalize_top_k_weights=True).eval()
    torch.testing.assert_close(router(torch.randn(7, 32)).top_k_weights_TK, torch.ones(7, 1))


def test_router_is_float32_under_bf16_autocast():
    router = make_router().eval()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = router(torch.randn(6, 32, dtype=torch.bfloat16))
    assert out.logits_TE.dtype == torch.float32
    assert out.top_k_weights_TK.dtype == torch.float32
    assert out.balance_loss.dtype == torch.float32 and out.z_loss.dtype == torch.float32


@pytest.mark.parametrize(
    "noise", [dict(router_jitter_noise=0.1), dict(router_logit_noise_std=1.0), dict(router_type="noisy_topk")]
)
def test_noise_only_in_training(noise):
    router = make_router(**noise)
    hidden_TD = torch.randn(16, 32)
    router.eval()
    assert torch.equal(router(hidden_TD).logits_TE, router(hidden_TD).logits_TE)
    router.train()
    assert not torch.equal(router(hidden_TD).logits_TE, router(hidden_TD).logits_TE)


def test_noisy_top_k_trains_its_noise_with_the_cv_squared_loss():
    router = make_router(router_type="noisy_topk", aux_loss_type="cv_squared").train()
    torch.nn.init.normal_(router.noise_weight, std=0.1)
    router(torch.randn(32, 32)).balance_loss.backward()
    assert router.weight.grad.abs().sum() > 0
    assert router.noise_weight.grad.abs().sum() > 0


def test_expert_capacity_formula():
    assert expert_capacity(100, 4, 2, 1.0, 4) == 50  # ceil(1.0 * 100 * 2 / 4)
    assert expert_capacity(10, 8, 1, 1.25, 4) == 4  # ceil(1.5625) = 2, raised to min_capacity
    assert expert_capacity(3, 2, 1, 10.0, 0) == 3  # never more than the number of tokens


def test_capacity_by_position_keeps_first_choices_then_token_order():
    # 4 tokens, top-2 over 2 experts, capacity 2 per expert
    index_TK = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    probs_TK = torch.full((4, 2), 0.5)
    kept_TK = capacity_keep_mask(index_TK, probs_TK, num_experts=2, capacity=2, drop_policy="position")
    # expert 0 first choices: tokens 0, 1, 3 -> 0, 1 kept; expert 1 first choices: token 2, then second choice of 0
    expected = torch.tensor([[True, True], [True, False], [True, False], [False, False]])
    assert torch.equal(kept_TK, expected)


def test_capacity_by_probability_keeps_the_most_confident():
    index_TK = torch.tensor([[0], [0], [0], [1]])
    probs_TK = torch.tensor([[0.6], [0.9], [0.7], [0.8]])
    kept_TK = capacity_keep_mask(index_TK, probs_TK, num_experts=2, capacity=2, drop_policy="probability")
    assert kept_TK.squeeze(-1).tolist() == [False, True, True, True]


def test_capacity_puts_padding_last():
    index_TK = torch.tensor([[0], [0], [0]])
    mask_T = torch.tensor([0, 1, 1])  # token 0 is padding: it must not take a real token's slot
    kept_TK = capacity_keep_mask(index_TK, torch.ones(3, 1), 1, capacity=2, token_mask_T=mask_T)
    assert kept_TK.squeeze(-1).tolist() == [False, True, True]


def test_capacity_counts_never_exceed_capacity():
    torch.manual_seed(1)
    index_TK = torch.randint(0, 8, (200, 2))
    kept_TK = capacity_keep_mask(index_TK, torch.rand(200, 2), 8, capacity=20, drop_policy="probability")
    kept_per_expert = torch.bincount(index_TK[kept_TK], minlength=8)
    all_per_expert = torch.bincount(index_TK.reshape(-1), minlength=8)
    assert torch.equal(kept_per_expert, all_per_expert.clamp(max=20))


def test_router_drops_and_zeroes_weights_of_dropped_slots():
    router = make_router(num_experts_per_tok=1, capacity_factor=0.5, min_capacity=0).train()
    out = router(torch.randn(64, 32))
    capacity = expert_capacity(64, 4, 1, 0.5, 0)
    assert out.kept_TK is not None
    assert torch.bincount(out.top_k_index_TK[out.kept_TK], minlength=4).max() <= capacity
    assert (out.top_k_weights_TK[~out.kept_TK] == 0).all()
    router.eval()  # eval_capacity_factor=None: dropless at evaluation
    assert router(torch.randn(64, 32)).kept_TK is None


def test_bad_drop_policy_is_rejected():
    with pytest.raises(ValueError, match="drop_policy"):
        capacity_keep_mask(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 1, 1, drop_policy="random")


def test_unit_combine_weights_select_without_weighting():
    router = make_router(num_experts_per_tok=2, unit_combine_weights=True, eval_capacity_factor=0.5).eval()
    out = router(torch.randn(32, 32))
    assert torch.equal(out.top_k_weights_TK, out.kept_TK.float())


def test_unit_combine_weights_exclude_explicit_normalization():
    with pytest.raises(Exception, match="unit_combine_weights"):
        tiny_gpt2_moe_config(unit_combine_weights=True, normalize_top_k_weights=True)
