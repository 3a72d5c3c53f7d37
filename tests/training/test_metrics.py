"""RouterBalance (evaluate metric, offline) and the perplexity helper (causal and seq2seq)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import default_data_collator

from hf_moe.training import RouterBalance, moe_blocks, perplexity

from .helpers import causal_examples, seq2seq_examples, tiny_gpt2, tiny_t5


def test_router_balance_on_known_assignments():
    result = RouterBalance().compute(expert_index=[0, 1, 1, 3], num_experts=4)
    assert result["token_fraction"] == [0.25, 0.5, 0.0, 0.25]
    assert result["load_imbalance"] == 2.0
    assert result["cv"] == pytest.approx(math.sqrt(0.5))  # loads [1, 2, 0, 1]: mean 1, variance 0.5
    assert result["dead_experts"] == 1 and result["num_assignments"] == 4
    assert result["load_entropy"] == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.5)) / math.log(4))


def test_router_balance_per_token_rows_and_batches():
    metric = RouterBalance()
    metric.add_batch(expert_index=[[0, 1], [2, 3]])
    metric.add_batch(expert_index=[[0, 1]])
    result = metric.compute(num_experts=4)
    assert result["token_fraction"] == [1 / 3, 1 / 3, 1 / 6, 1 / 6]
    perfect = RouterBalance().compute(expert_index=torch.arange(8).remainder(4).tolist())
    assert (perfect["load_imbalance"], perfect["cv"], perfect["load_entropy"]) == (1.0, 0.0, pytest.approx(1.0))
    with pytest.raises(ValueError, match="num_experts"):
        RouterBalance().compute(expert_index=[0, 5], num_experts=4)


def reference_nll(model, batch, is_seq2seq):
    # the router losses are off, so the model's own loss is the mean token NLL
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_perplexity_is_exp_of_mean_token_nll(family):
    if family == "gpt2":
        model = tiny_gpt2(router_aux_loss_coef=0.0, router_z_loss_coef=0.0).eval()
        examples = causal_examples(6)
    else:
        model = tiny_t5(router_aux_loss_coef=0.0, router_z_loss_coef=0.0).eval()
        examples = seq2seq_examples(6)
    whole = default_data_collator(examples)
    expected = math.exp(reference_nll(model, whole, family == "t5"))
    # batches of 4 and 2: equal token counts per row, so token weighting and the one-batch mean agree
    assert perplexity(model, examples, batch_size=4) == pytest.approx(expected, rel=1e-5)
    loader = DataLoader(examples, batch_size=3, collate_fn=default_data_collator)
    assert perplexity(model, loader) == pytest.approx(expected, rel=1e-5)


def test_perplexity_leaves_counters_and_mode_alone():
    model = tiny_gpt2().train()
    model(torch.randint(3, 99, (1, 5)))
    before = [block.routed_tokens_per_expert.clone() for _, block in moe_blocks(model)]
    examples = [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in causal_examples(4)]
    assert perplexity(model, examples) > 1.0
    assert model.training
    for (_, block), counts in zip(moe_blocks(model), before, strict=True):
        assert torch.equal(block.routed_tokens_per_expert, counts)
