"""BASE layers (Lewis et al. 2021): a balanced linear assignment in training, greedy top-1 in evaluation.

The defining properties, each checked with numbers: the assignment's total score equals the exact balanced optimum
(scipy's `linear_sum_assignment` over every choice of which experts take the ceil), every expert gets floor or ceil
of the real tokens, padding gets the sentinel, ties and T < E and T' = 0 still balance, evaluation is the argmax, the
combine weight is sigmoid(score), and both families train (balanced in every forward), save, load, describe and
generate with it.
"""

from __future__ import annotations

import inspect
import itertools
import math
import re

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from scipy.optimize import linear_sum_assignment
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import hf_moe
from hf_moe.hub import render_model_card
from hf_moe.modeling import BaseLayerRouter, RoutingInputs, balanced_assignment, moe_blocks, moe_routers, routing_base
from hf_moe.modeling.routing_base import CHECK_EVERY, MAX_ROUNDS, auction_balanced_assignment
from tests.conftest import tiny_gpt2_moe_config
from tests.modeling.test_t5_moe import tiny_config as tiny_t5_config

CARD_LABEL = "BASE layers: balanced assignment (Lewis et al. 2021)"


def optimal_balanced_total(scores_TE: torch.Tensor) -> float:
    """The exact balanced optimum, independently of the solver's reduction: for every set of r = T % E experts that
    take the ceil, a square assignment problem (expert e's column repeated to its capacity) solved by scipy."""
    scores = scores_TE.double().numpy()
    num_tokens, num_experts = scores.shape
    if num_tokens == 0:
        return 0.0
    per_expert, extra = divmod(num_tokens, num_experts)
    best = -math.inf
    for ceil_experts in itertools.combinations(range(num_experts), extra):
        columns = [e for e in range(num_experts) for _ in range(per_expert + (e in ceil_experts))]
        matrix = scores[:, columns]
        rows, cols = linear_sum_assignment(matrix, maximize=True)
        best = max(best, float(matrix[rows, cols].sum()))
    return best


def total_of(scores_TE: torch.Tensor, expert_T: torch.Tensor) -> float:
    return float(scores_TE.double().gather(1, expert_T.unsqueeze(1)).sum())


def assert_balanced(expert_T: torch.Tensor, num_experts: int, num_real: int) -> None:
    load_E = torch.bincount(expert_T[expert_T < num_experts], minlength=num_experts)
    assert load_E.sum().item() == num_real
    floor, ceil = num_real // num_experts, -(-num_real // num_experts)
    assert load_E.min().item() >= floor and load_E.max().item() <= ceil, load_E.tolist()


# --- the solver -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [2, 3, 4, 8])
@pytest.mark.parametrize("num_tokens", [5, 8, 13, 32])
def test_the_assignment_is_balanced_and_optimal_like_scipy(num_tokens, num_experts):
    # 30 seeds per shape; every third has a popular expert (a shared offset), every third many ties (rounded scores)
    for seed in range(30):
        generator = torch.Generator().manual_seed(seed)
        scores_TE = torch.randn(num_tokens, num_experts, generator=generator)
        if seed % 3 == 1:
            scores_TE = scores_TE + 3 * torch.randn(1, num_experts, generator=generator)
        elif seed % 3 == 2:
            scores_TE = (2 * scores_TE).round() / 2
        expert_T = balanced_assignment(scores_TE)
        assert expert_T.dtype == torch.int64 and expert_T.shape == (num_tokens,)
        assert_balanced(expert_T, num_experts, num_tokens)
        assert total_of(scores_TE, expert_T) == pytest.approx(optimal_balanced_total(scores_TE), abs=1e-4)


def test_padding_gets_the_sentinel_and_the_real_tokens_are_solved_alone():
    num_tokens, num_experts = 24, 4
    for seed in range(10):
        generator = torch.Generator().manual_seed(seed)
        scores_TE = torch.randn(num_tokens, num_experts, generator=generator)
        token_mask_T = (torch.rand(num_tokens, generator=generator) < 0.6).long()
        # padding scores that would win everything if padding counted
        scores_TE[token_mask_T == 0] += 100.0
        expert_T = balanced_assignment(scores_TE, token_mask_T)
        is_real_T = token_mask_T.bool()
        assert torch.equal(expert_T[~is_real_T], torch.full_like(expert_T[~is_real_T], num_experts))
        assert_balanced(expert_T, num_experts, int(is_real_T.sum()))
        real_scores_TE = scores_TE[is_real_T]
        assert total_of(real_scores_TE, expert_T[is_real_T]) == pytest.approx(
            optimal_balanced_total(real_scores_TE), abs=1e-4
        )


@pytest.mark.parametrize(("num_tokens", "num_experts"), [(10, 4), (3, 8), (8, 8), (1, 2), (64, 8), (7, 1)])
def test_all_equal_scores_and_fewer_tokens_than_experts_still_balance(num_tokens, num_experts):
    expert_T = balanced_assignment(torch.zeros(num_tokens, num_experts))
    assert_balanced(expert_T, num_experts, num_tokens)
    if num_tokens < num_experts:
        assert expert_T.unique().numel() == num_tokens  # T < E: every token has an expert of its own


def test_no_real_tokens_gives_all_sentinels():
    scores_TE = torch.randn(6, 4)
    expert_T = balanced_assignment(scores_TE, torch.zeros(6, dtype=torch.long))
    assert torch.equal(expert_T, torch.full((6,), 4))
    assert balanced_assignment(torch.randn(0, 4)).shape == (0,)


def test_larger_problem_is_balanced_and_optimal_against_the_dummy_reduction():
    """T = 300, E = 16 is too many ceil choices to enumerate; scipy on the docstring's reduction (q + 1 columns per
    expert, E - r dummy rows that may only take each expert's last column) is exact too."""
    num_tokens, num_experts = 300, 16
    scores_TE = torch.randn(num_tokens, num_experts)
    token_mask_T = (torch.rand(num_tokens) < 0.9).long()
    result = auction_balanced_assignment(scores_TE, token_mask_T)
    assert result.converged
    is_real_T = token_mask_T.bool()
    num_real = int(is_real_T.sum())
    assert_balanced(result.expert_T, num_experts, num_real)
    real = scores_TE[is_real_T].double().numpy()
    per_expert, extra = divmod(num_real, num_experts)
    matrix = np.repeat(real, per_expert + 1, axis=1)
    last_column = np.arange(matrix.shape[1]) % (per_expert + 1) == per_expert
    dummies = np.tile(np.where(last_column, 0.0, -1e9), (num_experts - extra, 1))
    matrix = np.concatenate([matrix, dummies])
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    optimum = float(matrix[rows, cols].sum())
    assert total_of(scores_TE[is_real_T], result.expert_T[is_real_T]) == pytest.approx(optimum, abs=1e-4)


def test_host_syncs_are_one_per_check_interval_and_bounded():
    result = auction_balanced_assignment(torch.randn(512, 8))
    assert result.converged
    assert result.rounds % CHECK_EVERY == 0 and result.host_syncs == result.rounds // CHECK_EVERY
    assert 1 <= result.host_syncs <= MAX_ROUNDS // CHECK_EVERY


def test_the_round_bound_falls_back_to_a_balanced_assignment():
    scores_TE = torch.randn(50, 4) + torch.tensor([3.0, 0.0, 0.0, 0.0])  # one popular expert: not solved in 1 round
    with pytest.warns(RuntimeWarning, match="did not converge"):
        result = auction_balanced_assignment(scores_TE, max_rounds=1)
    assert not result.converged and result.rounds == 1 and result.host_syncs == 1
    assert_balanced(result.expert_T, 4, 50)


def test_the_solver_hard_codes_no_device_and_no_host_reads_but_its_one_check():
    """No GPU here: the solver's source names no device, reads nothing back to the host except the convergence flag,
    and every tensor it creates follows the scores' device."""
    assert not re.search(r"\bcpu\b|\.cuda\b|\.item\(|\.tolist\(|\.numpy\(", inspect.getsource(routing_base))
    solver = (routing_base.auction_balanced_assignment, routing_base._Auction, routing_base._balanced_by_sort)
    source = "".join(inspect.getsource(part) for part in solver)
    assert source.count("bool(") == 1  # the convergence check
    for call in re.findall(r"torch\.(?:full|zeros|ones|arange|empty)\((?:[^()]|\([^()]*\))*\)", source):
        assert "device=" in call, call
    # and a dtype other than float32 in: computed in float32, same answer
    scores_TE = torch.randn(40, 4)
    assert torch.equal(balanced_assignment(scores_TE.double()), balanced_assignment(scores_TE))


# --- the router -------------------------------------------------------------------------------------------------


def make_router(**overrides) -> BaseLayerRouter:
    router = BaseLayerRouter(tiny_gpt2_moe_config(router_type="base", num_experts_per_tok=1, **overrides), 32)
    router.init_weights(1.0)
    return router


def test_training_balances_with_sigmoid_weights_and_evaluation_is_greedy_top1():
    router = make_router()
    hidden_TD = torch.randn(30, 32)
    token_mask_T = torch.ones(30, dtype=torch.long)
    token_mask_T[-5:] = 0
    inputs = RoutingInputs(hidden_TD, num_sequences=3, token_mask_T=token_mask_T)
    scores_TE = hidden_TD @ router.weight.T

    decision = router.train()(inputs)
    assert decision.top_k_index_TK.shape == (30, 1) and decision.probs_TE is None
    torch.testing.assert_close(decision.logits_TE, scores_TE)
    expert_T = decision.top_k_index_TK[:, 0]
    assert_balanced(expert_T, 4, 25)
    assert (expert_T[-5:] == 4).all() and (decision.top_k_weights_TK[-5:] == 0).all()
    chosen_T = scores_TE[:25].gather(1, expert_T[:25, None])[:, 0]
    torch.testing.assert_close(decision.top_k_weights_TK[:25, 0], torch.sigmoid(chosen_T))
    # with this spread of scores the balanced assignment is not the argmax: the two modes differ
    assert not torch.equal(expert_T[:25], scores_TE[:25].argmax(-1))

    decision = router.eval()(inputs)
    assert torch.equal(decision.top_k_index_TK[:, 0], scores_TE.argmax(-1))
    torch.testing.assert_close(decision.top_k_weights_TK[:, 0], torch.sigmoid(scores_TE.max(-1).values))


def test_gradients_reach_the_router_through_the_combine_weight():
    router = make_router().train()
    decision = router(RoutingInputs(torch.randn(16, 32)))
    decision.top_k_weights_TK.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_config_checks():
    # transformers' strict dataclass wraps the router's ValueError (DESIGN.md): the cause is the ValueError
    with pytest.raises(StrictDataclassClassValidationError, match="num_experts_per_tok") as error:
        hf_moe.GPT2MoeConfig(router_type="base", num_experts_per_tok=2)
    assert isinstance(error.value.__cause__, ValueError) and "one expert per token" in str(error.value.__cause__)
    with pytest.raises(StrictDataclassClassValidationError, match="router_jitter_noise"):
        tiny_gpt2_moe_config(router_type="base", num_experts_per_tok=1, router_jitter_noise=0.1)
    config = tiny_gpt2_moe_config(router_type="base", num_experts_per_tok=1)
    assert config.experts_per_token == 1 and config.aux_loss_coef == 0.0


# --- end to end -------------------------------------------------------------------------------------------------


def tiny(family: str):
    if family == "gpt2":
        return hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(router_type="base", num_experts_per_tok=1))
    return hf_moe.T5MoeForConditionalGeneration(tiny_t5_config(router_type="base", num_experts_per_tok=1))


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_both_families_train_balanced_save_load_describe_and_generate(family, tmp_path):
    model = tiny(family).train()
    assert all(isinstance(router, BaseLayerRouter) for _, router in moe_routers(model))
    assert model.config.parameter_counts()["total"] == model.num_parameters()
    input_ids = torch.randint(2, 99, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -4:] = 0  # padding: 23 real tokens, not divisible by 4 experts
    labels = torch.randint(2, 99, (3, 5)) if model.config.is_encoder_decoder else input_ids
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(router.weight.grad.abs().sum() > 0 for _, router in moe_routers(model))
    for _, block in moe_blocks(model):
        assert block.num_forwards.item() == 1
        assert block.balanced_forwards.item() == block.num_forwards.item()
        load_E = block.routed_tokens_per_expert
        assert load_E.sum().item() == block.num_tokens.item() and load_E.max() - load_E.min() <= 1
    if family == "gpt2":
        # the encoder-free decoder's MoE layers see the padded batch: 23 real tokens -> loads 6, 6, 6, 5
        assert all(block.num_tokens.item() == 23 for _, block in moe_blocks(model))

    model.eval()
    model.save_pretrained(tmp_path)
    auto = AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert f"| Router | `base`: {CARD_LABEL} |" in str(render_model_card(loaded.config))
    from hf_moe.cli.inspect import describe

    assert describe(str(tmp_path))["router_type"] == "base"
    generated = loaded.generate(input_ids[1:], max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] >= 3
