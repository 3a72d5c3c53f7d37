"""Dispatch: capacity (formula, drop policies, scopes, padding, unused slots) and running experts on kept slots."""

from __future__ import annotations

import pytest
import torch

from hf_moe.modeling.dispatch import Capacity, capacity_keep_mask, expert_capacity, run_experts
from hf_moe.modeling.routing import RouterDecision, RoutingInputs
from tests.conftest import tiny_gpt2_moe_config


def test_expert_capacity_formula():
    assert expert_capacity(100, 4, 2, 1.0, 4) == 50  # ceil(1.0 * 100 * 2 / 4)
    assert expert_capacity(10, 8, 1, 1.25, 4) == 4  # ceil(1.5625) = 2, raised to min_capacity
    assert expert_capacity(3, 2, 1, 10.0, 0) == 3  # never more than the number of tokens


def test_capacity_by_position_keeps_first_choices_then_token_order():
    # 4 tokens, top-2 over 2 experts, capacity 2 per expert
    index_TK = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    kept_TK = capacity_keep_mask(index_TK, None, num_experts=2, capacity=2, drop_policy="position")
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
    kept_TK = capacity_keep_mask(index_TK, None, 1, capacity=2, token_mask_T=mask_T)
    assert kept_TK.squeeze(-1).tolist() == [False, True, True]


def test_capacity_counts_never_exceed_capacity():
    torch.manual_seed(1)
    index_TK = torch.randint(0, 8, (200, 2))
    kept_TK = capacity_keep_mask(index_TK, torch.rand(200, 2), 8, capacity=20, drop_policy="probability")
    kept_per_expert = torch.bincount(index_TK[kept_TK], minlength=8)
    all_per_expert = torch.bincount(index_TK.reshape(-1), minlength=8)
    assert torch.equal(kept_per_expert, all_per_expert.clamp(max=20))


@pytest.mark.parametrize("drop_policy", ["position", "probability"])
def test_sequence_scope_gives_every_sequence_its_own_capacity(drop_policy):
    torch.manual_seed(2)
    num_sequences, length = 3, 10
    index_TK = torch.randint(0, 4, (num_sequences * length, 1))
    priority_TK = torch.rand(num_sequences * length, 1)
    kept_TK = capacity_keep_mask(index_TK, priority_TK, 4, 2, drop_policy, num_sequences=num_sequences)
    # each sequence alone, with the batch scope, keeps exactly what it keeps inside the batch
    for row in range(num_sequences):
        rows = slice(row * length, (row + 1) * length)
        alone = capacity_keep_mask(index_TK[rows], priority_TK[rows], 4, 2, drop_policy)
        assert torch.equal(kept_TK[rows], alone)
        assert torch.bincount(index_TK[rows][alone[:, 0]].reshape(-1), minlength=4).max() <= 2


def test_unused_slots_take_no_capacity_and_are_never_kept():
    index_TK = torch.tensor([[4, 0], [0, 4], [0, 1]])  # 4 = sentinel of an unused slot (E = 4)
    kept_TK = capacity_keep_mask(index_TK, None, num_experts=4, capacity=1)
    # expert 0's one slot goes to token 1 (a first choice), not to token 0's second choice
    assert kept_TK.tolist() == [[False, False], [True, False], [False, True]]


def make_capacity(**overrides) -> Capacity:
    return Capacity(tiny_gpt2_moe_config(**overrides))


def decision_of(index_TK: torch.Tensor, num_experts: int = 4) -> RouterDecision:
    logits_TE = torch.randn(index_TK.shape[0], num_experts)
    return RouterDecision(logits_TE, index_TK, torch.ones(index_TK.shape, dtype=torch.float32))


def test_capacity_settings_train_eval_and_fixed():
    index_TK = torch.zeros(16, 1, dtype=torch.long)
    inputs = RoutingInputs(torch.randn(16, 32), num_sequences=2)
    capacity = make_capacity(num_experts_per_tok=1, capacity_factor=0.5, min_capacity=0)
    assert capacity.keep_mask(decision_of(index_TK), inputs, training=True, leaves_slots_unused=False).sum() == 2
    assert capacity.keep_mask(decision_of(index_TK), inputs, training=False, leaves_slots_unused=False) is None
    fixed = make_capacity(num_experts_per_tok=1, expert_capacity=3, capacity_scope="sequence")
    for training in (True, False):
        kept_TK = fixed.keep_mask(decision_of(index_TK), inputs, training, leaves_slots_unused=False)
        assert kept_TK[:8].sum() == 3 and kept_TK[8:].sum() == 3  # 3 per expert in each of the 2 sequences


def test_dropless_routers_with_unused_slots_still_get_a_keep_mask():
    index_TK = torch.tensor([[0, 4], [1, 2]])
    kept_TK = make_capacity().keep_mask(decision_of(index_TK), RoutingInputs(torch.randn(2, 32)), True, True)
    assert kept_TK.tolist() == [[True, False], [True, True]]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(capacity_scope="token"), "capacity_scope"),
        (dict(expert_capacity=0), "expert_capacity"),
        (dict(expert_capacity=2, capacity_factor=1.0), "expert_capacity"),
    ],
)
def test_bad_capacity_settings_name_the_field(overrides, field):
    with pytest.raises(Exception, match=field):
        tiny_gpt2_moe_config(**overrides)


def test_bad_drop_policy_is_rejected():
    with pytest.raises(ValueError, match="drop_policy"):
        capacity_keep_mask(torch.zeros(2, 1, dtype=torch.long), None, 1, 1, drop_policy="random")


class RowsSeen(torch.nn.Module):
    """Pass-through 'experts' that record how many rows they got: out = weight * hidden."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def forward(self, hidden_TD, top_k_index_TK, top_k_weights_TK):
        self.rows.append(hidden_TD.shape[0])
        return (hidden_TD.unsqueeze(1) * top_k_weights_TK.unsqueeze(-1)).sum(dim=1)


def test_run_experts_only_on_kept_slots_and_sums_them_per_token():
    experts = RowsSeen()
    hidden_TD = torch.randn(3, 5, requires_grad=True)
    index_TK = torch.tensor([[0, 1], [1, 4], [2, 3]])
    weights_TK = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]], requires_grad=True)
    kept_TK = torch.tensor([[True, False], [True, False], [True, True]])
    out_TD = run_experts(experts, hidden_TD, index_TK, weights_TK, kept_TK)
    assert experts.rows == [4]  # dropped and unused slots cost no expert rows
    torch.testing.assert_close(out_TD, hidden_TD * torch.tensor([[0.5], [1.0], [1.0]]))
    # gradients flow to the kept slots only: d out / d hidden = sum of kept weights, d out / d weight = hidden
    grad_TD = torch.randn(3, 5)
    out_TD.backward(grad_TD)
    torch.testing.assert_close(hidden_TD.grad, grad_TD * torch.tensor([[0.5], [1.0], [1.0]]))
    slot_grad_T = (grad_TD * hidden_TD.detach()).sum(dim=-1)
    torch.testing.assert_close(weights_TK.grad, slot_grad_T.unsqueeze(-1) * kept_TK.float())
    # no slot kept: the experts are skipped unless a collective needs every rank (expert parallelism)
    run_experts(experts, hidden_TD, index_TK, weights_TK, torch.zeros_like(kept_TK))
    run_experts(experts, hidden_TD, index_TK, weights_TK, torch.zeros_like(kept_TK), always_call=True)
    assert experts.rows == [4, 0]
