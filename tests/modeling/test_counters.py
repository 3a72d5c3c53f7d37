"""The block's routing counters against a slot-by-slot reference, for every combination the fast paths of `_count`
distinguish: padding mask or not, drops or not, unused slots (sentinel id E) or not, several forwards."""

from __future__ import annotations

import pytest
import torch

from hf_moe.modeling.routing import RouterDecision
from hf_moe.modeling.sparse_moe import RouterLossValues
from tests.modeling.test_sparse_moe import make_block

NUM_TOKENS, TOP_K, NUM_EXPERTS = 12, 2, 4


def reference_counts(decisions: list[tuple]) -> dict[str, torch.Tensor]:
    """Each counter as the docstrings of `SparseMoeBlock.COUNTERS` define it, summed one slot at a time."""
    counts = {
        "routed_tokens_per_expert": torch.zeros(NUM_EXPERTS),
        "dropped_tokens_per_expert": torch.zeros(NUM_EXPERTS),
        **{name: torch.zeros(()) for name in ("router_entropy_sum", "num_tokens", "kept_slots_sum")},
        **{name: torch.zeros(()) for name in ("tokens_without_expert", "balanced_forwards", "balance_loss_sum")},
        **{name: torch.zeros(()) for name in ("z_loss_sum", "num_forwards")},
    }
    for decision, kept_TK, mask_T, losses in decisions:
        kept_load_E = torch.zeros(NUM_EXPERTS)
        for token in range(NUM_TOKENS):
            if mask_T is not None and mask_T[token] == 0:
                continue
            counts["num_tokens"] += 1
            probs_E = decision.routing_probs()[token]
            counts["router_entropy_sum"] += -(probs_E * probs_E.log()).nan_to_num().sum()
            kept_here = 0
            for slot in range(TOP_K):
                expert = int(decision.top_k_index_TK[token, slot])
                if expert == NUM_EXPERTS:  # unused slot
                    continue
                counts["routed_tokens_per_expert"][expert] += 1
                if kept_TK is not None and not kept_TK[token, slot]:
                    counts["dropped_tokens_per_expert"][expert] += 1
                else:
                    kept_load_E[expert] += 1
                    kept_here += 1
            counts["kept_slots_sum"] += kept_here
            counts["tokens_without_expert"] += kept_here == 0
        counts["balanced_forwards"] += kept_load_E.max() - kept_load_E.min() <= 1
        counts["balance_loss_sum"] += losses.balance_loss
        counts["z_loss_sum"] += losses.z_loss
        counts["num_forwards"] += 1
    return counts


def random_decision(seed: int, unused_slots: bool) -> RouterDecision:
    generator = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(NUM_TOKENS, NUM_EXPERTS, generator=generator)
    probs_TE = torch.softmax(logits_TE, dim=-1)
    probs_TE[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # a zero probability: entr(0) = 0
    index_TK = torch.randint(0, NUM_EXPERTS, (NUM_TOKENS, TOP_K), generator=generator)
    if unused_slots:
        index_TK[torch.rand(NUM_TOKENS, TOP_K, generator=generator) < 0.3] = NUM_EXPERTS
        index_TK[1] = NUM_EXPERTS  # a token with no used slot at all
    return RouterDecision(logits_TE, index_TK, torch.rand(NUM_TOKENS, TOP_K, generator=generator), probs_TE)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dropping", [False, True])
@pytest.mark.parametrize("unused_slots", [False, True])
def test_counters_match_a_slot_by_slot_reference(masked, dropping, unused_slots, monkeypatch):
    block = make_block(num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K)
    monkeypatch.setattr(type(block.router), "leaves_slots_unused", unused_slots)
    decisions = []
    for seed in range(3):
        generator = torch.Generator().manual_seed(100 + seed)
        kept_TK = torch.rand(NUM_TOKENS, TOP_K, generator=generator) < 0.6 if dropping else None
        mask_T = (torch.rand(NUM_TOKENS, generator=generator) < 0.7).long() if masked else None
        losses = RouterLossValues(torch.rand((), generator=generator), torch.rand((), generator=generator))
        decisions.append((random_decision(seed, unused_slots), kept_TK, mask_T, losses))
        block._count(*decisions[-1])
    expected = reference_counts(decisions)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(block, name), value, msg=name)
    assert block.num_tokens.item() < 3 * NUM_TOKENS if masked else block.num_tokens.item() == 3 * NUM_TOKENS
    if dropping:
        assert block.dropped_tokens_per_expert.sum() > 0  # the case this parametrization exists for
    if unused_slots:
        assert block.tokens_without_expert >= 3
