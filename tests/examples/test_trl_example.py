"""Smoke test of examples/trl_moe.py: SFT then DPO (reference adapter) of a tiny GPT-2 MoE built offline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_moe

pytest.importorskip("trl")


@pytest.mark.slow
def test_trl_example_runs_sft_then_dpo_with_an_adapter_and_writes_metrics(example, tmp_path, capsys):
    out = tmp_path / "trl"
    metrics = example("trl_moe").main(
        [
            "--corpus-chars", "20000", "--vocab-size", "300", "--n-layer", "2", "--n-embd", "32", "--sft-steps", "3",
            "--dpo-steps", "2", "--block-size", "24", "--batch-size", "4", "--reference", "adapter",
            "--output-dir", str(out),
        ]
    )  # fmt: skip
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["sft_steps"] == 3 and saved["dpo_steps"] == 2 and saved["held_out_pairs"] > 0
    for stage in ("before_sft", "after_sft", "after_dpo"):
        assert math.isfinite(saved[stage]["perplexity"]) and saved[stage]["perplexity"] > 1
        assert 0.0 <= saved[stage]["preference_accuracy"] <= 1.0
    # SFT trained the model; the router losses were in both trainers' logs and LoadBalanceCallback's metrics in both
    assert saved["after_sft"]["perplexity"] < saved["before_sft"]["perplexity"]
    assert saved["dpo_train_log"]["aux_loss"] > 0 and "rewards/accuracies" in saved["dpo_train_log"]
    assert saved["sft_moe"]["moe/load_imbalance"] >= 1.0 and saved["dpo_moe"]["moe/load_imbalance"] >= 1.0
    # the adapter was merged: dpo/ is a plain hf_moe model (no PEFT files), and it is the model that was measured
    assert not (out / "dpo" / "adapter_config.json").exists()
    dpo = AutoModelForCausalLM.from_pretrained(out / "dpo")
    assert isinstance(dpo, hf_moe.GPT2MoeForCausalLM)
    sft = AutoModelForCausalLM.from_pretrained(out / "sft")
    changed = [name for name, weight in dpo.state_dict().items() if not torch.equal(weight, sft.state_dict()[name])]
    assert changed and all("c_attn" in name for name in changed), changed  # LoRA's target only
    assert "held-out perplexity" in capsys.readouterr().out


def test_preference_pairs_have_equal_answers_and_keep_the_prompt_tokens(example):
    from hf_moe.training import read_corpus, train_bpe_tokenizer
    from hf_moe.training.distill_run import text_blocks

    texts = read_corpus(max_chars=20000)
    tokenizer = train_bpe_tokenizer(texts, 300, ["<e>"], eos_token="<e>", pad_token="<e>")
    blocks_NS, _ = text_blocks(tokenizer, texts, 24, 0.05)
    pairs = example("trl_moe").preference_pairs(tokenizer, blocks_NS[:200])
    assert len(pairs) > 20  # of 200 blocks: short code blocks often lack a word boundary early enough
    for index, pair in enumerate(pairs):
        assert pair["prompt_ids"] and len(pair["chosen_ids"]) == len(pair["rejected_ids"]) > 0
        assert pair["prompt_ids"] + pair["chosen_ids"] in blocks_NS.tolist()
        assert pair["chosen_ids"] != pair["rejected_ids"], index
        # what TRL's DPOTrainer does with the text: the prompt's own tokens must start prompt + answer's
        prompt_ids = tokenizer(pair["prompt"])["input_ids"]
        for answer in ("chosen", "rejected"):
            assert tokenizer(pair["prompt"] + pair[answer])["input_ids"][: len(prompt_ids)] == prompt_ids
