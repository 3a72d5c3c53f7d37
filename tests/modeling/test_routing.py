"""Routers: properties of the routing decisions (the router contract: `RoutingInputs` -> `RouterDecision`)."""

from __future__ import annotations

import pytest
import torch

from hf_moe.modeling import importance_load_balance_loss, switch_balance_loss
from hf_moe.modeling.registry import ROUTERS, build_router
from hf_moe.modeling.routing import NoisyTopKRouter, RoutingInputs, TopKRouter
from tests.conftest import tiny_gpt2_moe_config


def make_router(**overrides):
    config = tiny_gpt2_moe_config(**overrides)
    router = build_router(config, hidden_size=32)
    torch.nn.init.normal_(router.weight, std=0.5)
    return router


def route(router, hidden_TD, **inputs):
    return router(RoutingInputs(hidden_TD, **inputs))


def test_registry_builds_each_built_in_router_by_name():
    assert {"topk", "noisy_topk"} <= set(ROUTERS)
    assert isinstance(make_router(router_type="topk"), TopKRouter)
    assert isinstance(make_router(router_type="noisy_topk"), NoisyTopKRouter)
    assert ROUTERS["topk"].extra_parameters(4, 32) == sum(p.numel() for p in make_router().parameters())
    noisy = make_router(router_type="noisy_topk")
    assert ROUTERS["noisy_topk"].extra_parameters(4, 32) == sum(p.numel() for p in noisy.parameters())


def test_the_decision_carries_no_capacity_and_no_losses():
    decision = route(make_router().eval(), torch.randn(5, 32))
    assert decision._fields == ("logits_TE", "top_k_index_TK", "top_k_weights_TK", "probs_TE", "noise")


def test_sequence_ids_follow_the_batch_rows():
    inputs = RoutingInputs(torch.randn(6, 32), num_sequences=3)
    assert inputs.sequence_ids_T.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_selection_and_weights(top_k):
    router = make_router(num_experts_per_tok=top_k).eval()
    hidden_TD = torch.randn(20, 32)
    out = route(router, hidden_TD)
    probs_TE = torch.softmax(hidden_TD @ router.weight.t(), dim=-1)
    expected_probs, expected_index = probs_TE.topk(top_k, dim=-1)
    assert torch.equal(out.top_k_index_TK, expected_index)
    if top_k == 1:  # Switch: the raw probability is the combine weight
        torch.testing.assert_close(out.top_k_weights_TK, expected_probs)
    else:  # GShard / Mixtral: renormalized
        torch.testing.assert_close(out.top_k_weights_TK.sum(-1), torch.ones(20))


def test_explicit_normalization_overrides_the_default():
    router = make_router(num_experts_per_tok=1, normalize_top_k_weights=True).eval()
    torch.testing.assert_close(route(router, torch.randn(7, 32)).top_k_weights_TK, torch.ones(7, 1))


def test_router_is_float32_under_bf16_autocast():
    router = make_router().eval()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = route(router, torch.randn(6, 32, dtype=torch.bfloat16))
    assert out.logits_TE.dtype == torch.float32
    assert out.top_k_weights_TK.dtype == torch.float32


@pytest.mark.parametrize(
    "noise", [dict(router_jitter_noise=0.1), dict(router_logit_noise_std=1.0), dict(router_type="noisy_topk")]
)
def test_noise_only_in_training(noise):
    router = make_router(**noise)
    hidden_TD = torch.randn(16, 32)
    router.eval()
    assert torch.equal(route(router, hidden_TD).logits_TE, route(router, hidden_TD).logits_TE)
    router.train()
    assert not torch.equal(route(router, hidden_TD).logits_TE, route(router, hidden_TD).logits_TE)


def test_noisy_top_k_trains_its_noise_with_the_cv_squared_loss():
    router = make_router(router_type="noisy_topk", aux_loss_type="cv_squared").train()
    torch.nn.init.normal_(router.noise_weight, std=0.1)
    decision = route(router, torch.randn(32, 32))
    assert decision.noise is not None  # the smooth load estimator's inputs, in training
    importance_load_balance_loss(decision, decision.top_k_weights_TK).backward()
    assert router.weight.grad.abs().sum() > 0
    assert router.noise_weight.grad.abs().sum() > 0


def test_unit_combine_weights_select_without_weighting():
    router = make_router(num_experts_per_tok=2, unit_combine_weights=True).eval()
    out = route(router, torch.randn(32, 32))
    assert torch.equal(out.top_k_weights_TK, torch.ones(32, 2))


def test_unit_combine_weights_exclude_explicit_normalization():
    with pytest.raises(Exception, match="unit_combine_weights"):
        tiny_gpt2_moe_config(unit_combine_weights=True, normalize_top_k_weights=True)


def test_the_switch_loss_of_a_decision_is_switch_s_formula():
    router = make_router(num_experts_per_tok=1).eval()
    decision = route(router, torch.randn(40, 32))
    probs_TE = torch.softmax(decision.logits_TE, dim=-1)
    fraction_E = torch.bincount(decision.top_k_index_TK.reshape(-1), minlength=4).float() / 40
    expected = 4 * (fraction_E * probs_TE.mean(dim=0)).sum()
    torch.testing.assert_close(switch_balance_loss(decision, decision.top_k_weights_TK), expected)


def test_unused_slots_count_for_no_expert_in_the_losses():
    router = make_router(num_experts_per_tok=2).eval()
    decision = route(router, torch.randn(10, 32))
    index_TK = decision.top_k_index_TK.clone()
    index_TK[:, 1] = 4  # every second slot unused (sentinel id E)
    weights_TK = decision.top_k_weights_TK * (index_TK < 4)
    one_slot = decision._replace(top_k_index_TK=index_TK, top_k_weights_TK=weights_TK)
    # the Switch fraction of expert e counts only the first slots: halve their share of the K=2 slots
    first_only = decision._replace(top_k_index_TK=decision.top_k_index_TK[:, :1])
    torch.testing.assert_close(switch_balance_loss(one_slot, weights_TK), switch_balance_loss(first_only, None) / 2)
    assert torch.isfinite(importance_load_balance_loss(one_slot, weights_TK))
