"""Expert parallelism on 2 CPU processes (gloo) against one process: the same numbers, or a clear error."""

from __future__ import annotations

import pytest

from tests.parallel.conftest import save_tiny
from tests.parallel.launch import run_distributed
from tests.parallel.workers import bad_expert_count, equivalence_and_training, layout_independent_init

pytestmark = pytest.mark.multiprocess


def test_ep_matches_single_process(family, tmp_path):
    folder = save_tiny(family, tmp_path / "model")
    # and saves a consolidated checkpoint, reloaded on 1 process and on other layouts
    run_distributed(equivalence_and_training, family, folder, str(tmp_path))


def test_reset_experts_is_layout_independent(tmp_path):
    folder = save_tiny("t5", tmp_path / "model")
    run_distributed(layout_independent_init, "t5", folder, str(tmp_path))


def test_indivisible_expert_count_fails_clearly_on_every_rank(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "model", num_experts=3)
    run_distributed(bad_expert_count, "gpt2", folder, str(tmp_path))
