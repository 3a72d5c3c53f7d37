"""examples/run_seq2seq_moe.py: the span-corruption collator, and smoke runs on span corruption and on text pairs."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

import hf_moe

SENTINELS = [1000 + i for i in range(20)]
EOS, PAD = 1, 0


def test_random_spans_mask_has_the_requested_noise(example):
    random_spans_mask = example("run_seq2seq_moe").random_spans_mask
    rng = random.Random(0)
    for length in (2, 10, 64, 200):
        mask = random_spans_mask(length, 0.15, 3.0, rng)
        assert len(mask) == length
        assert 0 < sum(mask) < length
        assert sum(mask) == min(max(round(length * 0.15), 1), length - 1)
        assert not mask[0]  # T5 starts with a kept run


def test_span_corruption_round_trip(example):
    """Filling each sentinel of the input with the target's span gives back the original tokens."""
    collator = example("run_seq2seq_moe").SpanCorruptionCollator(SENTINELS, EOS, PAD, noise_density=0.3, seed=1)
    original = list(range(10, 74))
    inputs, targets = collator.corrupt(original)
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans: dict[int, list[int]] = {}
    for token in targets[:-1]:
        if token in SENTINELS:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    used = [token for token in inputs if token in SENTINELS]
    assert used == SENTINELS[: len(used)] == list(spans) and len(used) >= 2
    restored = [token for item in inputs[:-1] for token in (spans[item] if item in SENTINELS else [item])]
    assert restored == original
    assert all(spans.values())  # no empty span


def test_span_corruption_batch_is_padded(example):
    collator = example("run_seq2seq_moe").SpanCorruptionCollator(SENTINELS, EOS, PAD, seed=0)
    batch = collator([{"input_ids": list(range(10, 40))}, {"input_ids": list(range(10, 22))}])
    assert batch["input_ids"].shape[0] == 2 and batch["labels"].shape[0] == 2
    torch.testing.assert_close(batch["attention_mask"], (batch["input_ids"] != PAD).long())
    assert (batch["labels"][1] == -100).any()  # the shorter example's labels are padded with -100, not PAD


def test_span_corruption_refuses_too_few_sentinels(example):
    collator = example("run_seq2seq_moe").SpanCorruptionCollator(SENTINELS[:1], EOS, PAD, mean_span_length=1.0)
    with pytest.raises(ValueError, match="sentinel"):
        collator.corrupt(list(range(10, 110)))


TINY = ["--num-layers", "1", "--d-model", "32", "--d-ff", "64", "--num-heads", "4", "--num-experts", "4",
        "--max-steps", "3", "--batch-size", "4", "--logging-steps", "1", "--max-eval-samples", "4",
        "--max-new-tokens", "5", "--vocab-size", "400"]  # fmt: skip


@pytest.mark.slow
def test_run_seq2seq_moe_span_corruption(example, tmp_path, capsys, emitted):
    out = tmp_path / "out"
    example("run_seq2seq_moe").main(
        [*TINY, "--corpus-bytes", "60000", "--input-length", "32", "--num-sentinels", "8", "--output-dir", str(out)]
    )
    assert not emitted.spurious()
    printed = capsys.readouterr().out.splitlines()
    assert max(map(len, printed)) <= 300 and any(" | eval_moe: imbalance " in line for line in printed)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["task"] == "span_corruption"
    assert math.isfinite(saved["perplexity"]) and saved["perplexity"] > 1
    assert math.log(saved["perplexity"]) <= saved["eval_loss"] + 0.5  # different noise draws, router losses left out
    assert len(saved["samples"]) == 2 and "<extra_id_0>" in saved["samples"][0]["input"]
    assert saved["moe_metrics"]["moe/layer_00/tokens"] > 0
    model = AutoModelForSeq2SeqLM.from_pretrained(out / "model")
    assert isinstance(model, hf_moe.T5MoeForConditionalGeneration)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".tsv"])
def test_run_seq2seq_moe_pairs(example, tmp_path, suffix):
    rng = random.Random(0)
    pairs = []
    for _ in range(60):
        words = [
            rng.choice(["red", "green", "blue", "cat", "dog", "runs", "sleeps"]) for _ in range(rng.randrange(2, 6))
        ]
        pairs.append((" ".join(words), " ".join(reversed(words))))  # the task: reverse the words
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"src": s, "tgt": t}) + "\n" for s, t in pairs))
        fields = ["--source-field", "src", "--target-field", "tgt"]
    else:
        path.write_text("".join(f'{s} "quoted"\t{t}\n' for s, t in pairs))  # quotes are text in TSV
        fields = []
    out = tmp_path / "out"
    example("run_seq2seq_moe").main([*TINY, "--pairs-file", str(path), *fields, "--output-dir", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["task"] == "pairs" and saved["eval_samples"] == 3  # 5% of 60 held out
    assert math.isfinite(saved["perplexity"])
    reference = saved["samples"][0]["reference"]
    assert any(word in reference for word in ("red", "green", "blue", "cat", "dog", "runs", "sleeps"))
    if suffix == ".tsv":
        assert '"quoted"' in saved["samples"][0]["input"]
