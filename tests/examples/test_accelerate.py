"""examples/run_clm_moe.py under `accelerate launch` with 2 CPU processes: the README's exact recipe really starts
two processes (gloo), and the load-balance metrics every rank logs are the reduced (summed) ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel.launch import ACCELERATE_TWO_PROCESSES, free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_run_clm_moe_data_parallel_on_two_cpu_processes(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", *ACCELERATE_TWO_PROCESSES, "--main_process_port", str(free_port()),
        str(REPO / "examples" / "run_clm_moe.py"),
        "--n-layer", "2", "--n-embd", "32", "--num-experts", "4", "--vocab-size", "400", "--corpus-bytes", "60000",
        "--block-size", "16", "--batch-size", "2", "--max-steps", "4", "--logging-steps", "2",
        "--max-eval-samples", "8", "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    ranks = [json.loads((out / "world" / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" and r["parallel_mode"] == "distributed" for r in ranks)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2

    # one log window: 2 ranks x 2 steps x 2 blocks x 16 tokens (rank 0's counts alone would be half)
    first_log = next(record for record in metrics["log_history"] if "moe/layer_00/tokens" in record)
    assert first_log["moe/layer_00/tokens"] == 2 * 2 * 2 * 16
    # both ranks logged the same reduced metrics, although they trained on different blocks
    assert ranks[0]["moe_metrics"] and ranks[0]["moe_metrics"] == ranks[1]["moe_metrics"]
