"""Router losses: known values on hand-made inputs, lower bounds, masking."""

from __future__ import annotations

import math

import pytest
import torch

from hf_moe.modeling.losses import (
    accumulation_share,
    cv_squared,
    importance_load_loss,
    mean_over_layers,
    noisy_top_k_load,
    router_z_loss,
    switch_load_balancing_loss,
)


def test_switch_loss_is_one_at_uniform_routing():
    num_tokens, num_experts = 8, 4
    probs_TE = torch.full((num_tokens, num_experts), 1 / num_experts)
    index_TK = torch.arange(num_tokens).remainder(num_experts).unsqueeze(-1)  # each expert gets 2 tokens
    assert switch_load_balancing_loss(probs_TE, index_TK).item() == pytest.approx(1.0)


def test_switch_loss_known_value_and_collapse():
    # 2 tokens, 2 experts; token 0 -> expert 0 (p=0.9), token 1 -> expert 0 (p=0.6)
    probs_TE = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    index_TK = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.75, 0.25] -> 2 * (1 * 0.75) = 1.5
    assert switch_load_balancing_loss(probs_TE, index_TK).item() == pytest.approx(1.5)
    # full collapse with certainty reaches E
    collapsed = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert switch_load_balancing_loss(collapsed, torch.zeros(2, 1, dtype=torch.long)).item() == pytest.approx(3.0)


def test_switch_loss_top2_normalization():
    # top-2 over 2 experts: every token uses both, f = [0.5, 0.5]; P = [0.5, 0.5] -> 2 * 0.5 = 1
    probs_TE = torch.tensor([[0.7, 0.3], [0.3, 0.7]])
    index_TK = torch.tensor([[0, 1], [1, 0]])
    assert switch_load_balancing_loss(probs_TE, index_TK).item() == pytest.approx(1.0)


def test_switch_loss_ignores_masked_tokens():
    probs_TE = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.99, 0.01]])
    index_TK = torch.tensor([[0], [1], [0]])
    mask_T = torch.tensor([1, 1, 0])
    masked = switch_load_balancing_loss(probs_TE, index_TK, mask_T)
    assert masked.item() == pytest.approx(switch_load_balancing_loss(probs_TE[:2], index_TK[:2]).item())


def test_cv_squared():
    assert cv_squared(torch.tensor([3.0, 3.0, 3.0])).item() == pytest.approx(0.0)
    # values [0, 2]: mean 1, population variance 1 -> 1
    assert cv_squared(torch.tensor([0.0, 2.0])).item() == pytest.approx(1.0)
    assert cv_squared(torch.tensor([5.0])).item() == 0.0


def test_importance_load_loss_zero_when_balanced_and_positive_otherwise():
    gates_TE = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert importance_load_loss(gates_TE, torch.tensor([1.0, 1.0])).item() == pytest.approx(0.0)
    skewed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # importance [2, 0] -> cv^2 = 1; load [2, 0] -> 1
    assert importance_load_loss(skewed, torch.tensor([2.0, 0.0])).item() == pytest.approx(2.0)


def test_router_z_loss_known_value():
    logits_TE = torch.zeros(3, 4)  # logsumexp = log 4
    assert router_z_loss(logits_TE).item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
    mask_T = torch.tensor([1, 0, 0])
    big = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0, 0, 0], [50.0, 0, 0, 0]])
    assert router_z_loss(big, mask_T).item() == pytest.approx(math.log(4) ** 2, rel=1e-6)


def test_noisy_top_k_load_is_probability_mass_and_differentiable():
    torch.manual_seed(0)
    clean_TE = torch.randn(64, 4, requires_grad=True)
    noise_std_TE = torch.full((64, 4), 0.5)
    noisy_TE = clean_TE.detach() + torch.randn(64, 4) * noise_std_TE
    load_E = noisy_top_k_load(clean_TE, noisy_TE, noise_std_TE, top_k=2)
    assert load_E.shape == (4,)
    assert ((load_E >= 0) & (load_E <= 64)).all()
    # expected number of selected experts per token is about k: the smooth loads sum to roughly T * k
    assert load_E.sum().item() == pytest.approx(128, rel=0.25)
    load_E.sum().backward()
    assert clean_TE.grad is not None and clean_TE.grad.abs().sum() > 0


def test_noisy_top_k_load_when_every_expert_is_selected():
    load_E = noisy_top_k_load(torch.zeros(5, 2), torch.zeros(5, 2), torch.ones(5, 2), top_k=2)
    assert load_E.tolist() == [5.0, 5.0]


def test_mean_over_layers_and_accumulation_share():
    assert mean_over_layers(()) is None
    assert mean_over_layers((torch.tensor(1.0), torch.tensor(3.0))).item() == 2.0
    assert accumulation_share(torch.tensor(3), None) == 1.0
    assert accumulation_share(torch.tensor(3), 12).item() == 0.25
