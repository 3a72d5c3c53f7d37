"""examples/expert_parallel.py prints no DTensor hint per rank: the experts' 2D mesh is flattened (one all_reduce for
the gradient norm) and the unmergeable gathers of a save are silenced, that message only."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from hf_moe.modeling._compat import quiet_unmergeable_full_gathers as quiet_full_gathers
from tests.parallel.launch import free_port

REPO = Path(__file__).resolve().parents[2]
# the template torch 2.13's DTensor logs (torch/distributed/tensor/_redistribute.py), with its five arguments
TEMPLATE = (
    "While redistributing from %s to %s, %d sequential %s operations will be performed. This is suboptimal: "
    "multiple collective operations have higher latency (separate kernel launches and synchronization points) "
    "and may give inconsistent results between ranks due to different reduction orders. %s"
)
SAVE_GATHER = (
    (_StridedShard(0, split_factor=2), Shard(0)),
    (Replicate(), Replicate()),
    2,
    "all_gather",
    "it is not possible to merge non-ascending order all_gather operations.",
)
UNFLATTENED_REDUCE = (
    (Shard(0), Shard(0)),
    (Replicate(), Replicate()),
    2,
    "all_reduce",
    'To optimize, flatten mesh dimensions ["efsdp", "ep"] so DTensor can use a single operation instead.',
)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_quiet_full_gathers_silences_the_save_gather_hint_only():
    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    collect = Collect()
    logger.addHandler(collect)
    try:
        with quiet_full_gathers():
            logger.warning(TEMPLATE, *SAVE_GATHER)
            logger.warning(TEMPLATE, *UNFLATTENED_REDUCE)  # a missing flatten is worth hearing about
            logger.warning("something else")
        logger.warning(TEMPLATE, *SAVE_GATHER)  # outside the context nothing is filtered
    finally:
        logger.removeHandler(collect)
    assert len(collect.messages) == 3
    assert "all_reduce" in collect.messages[0] and collect.messages[1] == "something else"
    assert "non-ascending" in collect.messages[2]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_expert_parallel_example_prints_no_dtensor_hints(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(REPO / "examples" / "expert_parallel.py"), "--output-dir", str(tmp_path), "--max-steps", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "saved a consolidated checkpoint" in done.stdout  # the run saved: both warning sites were reached
    assert "While redistributing" not in done.stdout + done.stderr
