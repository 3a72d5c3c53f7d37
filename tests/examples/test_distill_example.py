"""Smoke test of examples/distill_moe.py: build a tiny MoE teacher offline, distill a Mixture-of-Students from it."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoModelForCausalLM

import hf_moe


@pytest.mark.slow
def test_distill_moe_builds_a_teacher_distills_and_writes_metrics(example, tmp_path, capsys):
    out = tmp_path / "distill"
    metrics = example("distill_moe").main(
        [
            "--corpus-chars", "20000", "--vocab-size", "300", "--n-layer", "2", "--n-embd", "32",
            "--num-experts", "4", "--top-k", "2", "--teacher-steps", "3", "--student", "mos", "--experts", "2",
            "--max-steps", "3", "--block-size", "16", "--batch-size", "4", "--eval-fraction", "0.02", "--output-dir", str(out),
        ]
    )  # fmt: skip
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["steps"] == 3 and saved["student"] == "mos"
    for key in ("teacher_perplexity", "student_perplexity_before", "student_perplexity_after"):
        # a perplexity is finite and at least 1; a 300-token vocabulary after a few steps is far from certain
        assert math.isfinite(saved[key]) and saved[key] > 1, (key, saved[key])
    assert saved["student_perplexity_after"] != saved["student_perplexity_before"]
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert isinstance(student, hf_moe.GPT2MoeForCausalLM)
    # every_other of 2 layers keeps one; 2 of the teacher's 4 experts
    assert student.config.n_layer == 1 and student.config.num_local_experts == 2
    assert AutoModelForCausalLM.from_pretrained(out / "teacher").config.num_local_experts == 4
    assert "held-out perplexity: teacher" in capsys.readouterr().out
