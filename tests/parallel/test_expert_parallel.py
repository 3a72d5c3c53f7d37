"""Expert parallelism on 2 CPU processes (gloo) against one process: the same numbers, or a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from tests.parallel.conftest import save_tiny
from tests.parallel.launch import run_distributed
from tests.parallel.workers import (
    bad_expert_count,
    best_model_is_restored,
    equivalence_and_training,
    expert_bias_balancing,
    layout_independent_init,
    resume_continues_exactly,
    resume_on_another_layout,
)

pytestmark = pytest.mark.multiprocess


def test_ep_matches_single_process(family, tmp_path):
    folder = save_tiny(family, tmp_path / "model")
    # and saves a consolidated checkpoint, reloaded on 1 process and on other layouts
    run_distributed(equivalence_and_training, family, folder, str(tmp_path))


# The literature's routers under EP. Each rank routes its own micro-batch, as the reference does micro-batch by
# micro-batch, so BASE's balanced assignment and expert choice are per rank (per micro-batch) on both sides.
ROUTER_OVERRIDES = {
    "hash": dict(router_type="hash", num_experts_per_tok=1),
    "base": dict(router_type="base", num_experts_per_tok=1),
    "dense_to_sparse": dict(router_type="dense_to_sparse", num_experts_per_tok=3),
    "expert_choice": dict(router_type="expert_choice", capacity_factor=2.0),
}
FAMILY_ROUTER_OVERRIDES = {
    # GPT-2's MoE layers are causal: expert choice needs the opt-in; T5 uses it in the encoder only
    "gpt2": {"expert_choice": dict(allow_noncausal_routing=True)},
    "t5": {"expert_choice": dict(decoder_moe_layers=[])},
}


@pytest.mark.parametrize("router", sorted(ROUTER_OVERRIDES))
def test_ep_matches_single_process_for_every_router(family, router, tmp_path):
    overrides = {**ROUTER_OVERRIDES[router], **FAMILY_ROUTER_OVERRIDES[family].get(router, {})}
    folder = save_tiny(family, tmp_path / "model", **overrides)
    run_distributed(equivalence_and_training, family, folder, str(tmp_path))


SHARED_EXPERT_OVERRIDES = {
    "shared_gated": dict(num_shared_experts=1, shared_expert_gate=True),
    "residual_moe": dict(residual_moe=True, num_experts_per_tok=1),
}
# PR-MoE: each layer sharded by its own count (GPT-2: 2 MoE layers; T5 tiny: 2 encoder + 2 decoder)
PYRAMIDS = {"gpt2": [2, 6], "t5": [2, 4, 4, 6]}


@pytest.mark.parametrize("architecture", sorted(SHARED_EXPERT_OVERRIDES))
def test_ep_matches_single_process_with_shared_experts(family, architecture, tmp_path):
    # shared experts (Residual-MoE's dense MLP and coefficient too) are dense weights: replicated on every rank,
    # beside the sharded routed experts
    folder = save_tiny(family, tmp_path / "model", **SHARED_EXPERT_OVERRIDES[architecture])
    run_distributed(equivalence_and_training, family, folder, str(tmp_path))


def test_ep_matches_single_process_with_a_pyramid(family, tmp_path):
    folder = save_tiny(family, tmp_path / "model", num_experts_per_layer=PYRAMIDS[family])
    run_distributed(equivalence_and_training, family, folder, str(tmp_path))


def test_ep_matches_single_process_with_shared_blocks(family, tmp_path):
    # WideNet: the tied expert weights are sharded once and every layer's experts module reaches the same shard;
    # gradients of every layer accumulate into it on each rank
    folder = save_tiny(family, tmp_path / "model", share_blocks_across_layers=True)
    run_distributed(equivalence_and_training, family, folder, str(tmp_path))
    # the consolidated EP checkpoint keeps one copy: the same tensor names as the single-process file
    with (
        safe_open(Path(folder) / "model.safetensors", "pt") as single,
        safe_open(tmp_path / "trained" / "model.safetensors", "pt") as consolidated,
    ):
        assert set(consolidated.keys()) == set(single.keys())


# 4 gloo processes also run on 2 cores (about 15 s each): the README's 4-rank diagram, and one expert per rank
@pytest.mark.parametrize("ep_size", [2, 4])
def test_ep_on_4_processes_matches_single_process(family, ep_size, tmp_path):
    folder = save_tiny(family, tmp_path / "model")
    run_distributed(equivalence_and_training, family, folder, str(tmp_path), ep_size, world_size=4, timeout=400)


def test_expert_bias_balancing_under_ep_matches_single_process(tmp_path):
    # both families in one launch
    folders = {family: save_tiny(family, tmp_path / family, router_bias_update_rate=0.05) for family in ("gpt2", "t5")}
    run_distributed(expert_bias_balancing, folders, str(tmp_path), timeout=300)


def test_reset_experts_is_layout_independent(tmp_path):
    folder = save_tiny("t5", tmp_path / "model")
    run_distributed(layout_independent_init, "t5", folder, str(tmp_path))


def test_indivisible_expert_count_fails_clearly_on_every_rank(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "model", num_experts=3)
    run_distributed(bad_expert_count, "gpt2", folder, str(tmp_path))


def test_moe_trainer_resumes_an_ep_run_exactly(family, tmp_path):
    folder = save_tiny(family, tmp_path / "model", expert_dropout=0.2)
    run_distributed(resume_continues_exactly, family, folder, str(tmp_path), timeout=300)


def test_moe_trainer_resumes_an_ep_checkpoint_on_another_layout(tmp_path):
    # no expert dropout: its per-rank streams follow the layout, so other masks would be drawn on ep_size=1
    folder = save_tiny("t5", tmp_path / "model")
    run_distributed(resume_on_another_layout, "t5", folder, str(tmp_path), timeout=300)


def test_moe_trainer_loads_the_best_ep_checkpoint_at_end(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "model")
    run_distributed(best_model_is_restored, "gpt2", folder, str(tmp_path), timeout=300)
