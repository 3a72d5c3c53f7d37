"""MoeTrainer's checkpoints on one process (the multi-process resume is in tests/parallel/test_expert_parallel.py)."""

from __future__ import annotations

import os

import pytest
import torch

import hf_moe
from hf_moe.training.sharded_checkpoint import SHARDED_STATE_DIR, load_sharded_model
from tests.training.helpers import causal_examples, tiny_gpt2, training_args


def test_unsharded_model_checkpoints_exactly_as_with_trainer(tmp_path):
    trainer = hf_moe.MoeTrainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path, save_strategy="steps", save_steps=2),
        train_dataset=causal_examples(),
    )
    trainer.train()
    saved = set(os.listdir(tmp_path / "checkpoint-2"))
    assert {"optimizer.pt", "scheduler.pt", "model.safetensors"} <= saved, saved
    assert SHARDED_STATE_DIR not in saved

    resumed = hf_moe.MoeTrainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path / "resumed", save_strategy="steps", save_steps=2),
        train_dataset=causal_examples(),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (name, param), expected in zip(resumed.model.named_parameters(), trainer.model.parameters(), strict=True):
        torch.testing.assert_close(param, expected, rtol=0, atol=0, msg=name)


def test_checkpoint_without_sharded_state_names_the_problem(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(FileNotFoundError, match="save_only_model=True"):
        load_sharded_model(tiny_gpt2(), str(tmp_path / "checkpoint-2"))
