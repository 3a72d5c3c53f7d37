"""Smoke test of examples/run_clm_moe.py: upcycle a dense GPT-2 folder, fine-tune on local text, evaluate."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import hf_moe
from hf_moe.conversion import REPORT_FILENAME
from tests.conftest import tiny_word_tokenizer


def write_word_text(path, lines: int, seed: int) -> None:
    """Lines of the tiny word tokenizer's words ("w3" ... "w98"), with some structure to learn."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(lines):
            start = rng.randrange(3, 90)
            handle.write(" ".join(f"w{start + i % 8}" for i in range(rng.randrange(8, 24))) + "\n")


@pytest.fixture
def dense_gpt2_folder(tmp_path):
    tokenizer = tiny_word_tokenizer()
    config = GPT2Config(vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=64)
    folder = tmp_path / "dense"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_run_clm_moe_upcycles_trains_and_evaluates(example, tmp_path, dense_gpt2_folder, capsys, emitted):
    write_word_text(tmp_path / "train.txt", 300, seed=0)
    write_word_text(tmp_path / "validation.txt", 40, seed=1)
    out = tmp_path / "out"
    metrics = example("run_clm_moe").main(
        [
            "--model", str(dense_gpt2_folder), "--num-experts", "4", "--top-k", "2",
            "--train-file", str(tmp_path / "train.txt"), "--validation-file", str(tmp_path / "validation.txt"),
            "--block-size", "16", "--batch-size", "4", "--max-steps", "4", "--logging-steps", "2",
            "--max-eval-samples", "8", "--output-dir", str(out),
        ]
    )  # fmt: skip
    assert not emitted.spurious()
    printed = capsys.readouterr().out.splitlines()
    # one short line per log: the per-layer, per-expert metrics are in metrics.json, not in every printed line
    assert max(map(len, printed)) <= 300 and any(" | moe: imbalance " in line for line in printed)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["world_size"] == 1
    assert saved["eval_samples"] == 8
    # the perplexity leaves out the router losses that the model's eval_loss adds
    assert math.isfinite(saved["perplexity"]) and 1 < saved["perplexity"] < 99
    assert math.log(saved["perplexity"]) <= saved["eval_loss"] + 1e-4
    # the load-balance callback reached the training and the evaluation logs
    assert saved["moe_metrics"]["moe/layer_00/tokens"] == 2 * 4 * 16  # 2 steps per log x 4 blocks x 16 tokens
    assert "moe/load_imbalance" in saved["moe_metrics"] and "eval_moe/load_imbalance" in saved["moe_metrics"]
    assert saved == json.loads(json.dumps(metrics, default=str))

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert isinstance(model, hf_moe.GPT2MoeForCausalLM) and model.config.num_local_experts == 4
    assert (out / "model" / "tokenizer.json").is_file()
    assert (out / "model" / REPORT_FILENAME).is_file()  # how the MoE was made travels with it


SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare").is_dir(), reason="needs ../shared/data (developers, CI)")
def test_run_clm_moe_on_shakespeare_with_the_gpt2_tokenizer(example, tmp_path):
    """A new GPT-2 MoE on a real corpus with GPT-2's own BPE files (vocab.json + merges.txt)."""
    out = tmp_path / "out"
    example("run_clm_moe").main(
        [
            "--train-file", str(SHARED_DATA / "tinyshakespeare" / "input.txt"),
            "--tokenizer", str(SHARED_DATA / "gpt2-tokenizer"),
            "--n-layer", "1", "--n-embd", "32", "--num-experts", "4", "--block-size", "32", "--batch-size", "4",
            "--max-steps", "3", "--logging-steps", "3", "--max-train-samples", "64", "--max-eval-samples", "8",
            "--output-dir", str(out),
        ]
    )  # fmt: skip
    saved = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(saved["perplexity"])
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.vocab_size == 50257
    assert (out / "model" / "tokenizer.json").is_file()
