"""2-process data-parallel run (torchrun, gloo on CPU): the logged counts are the sum of the per-rank counts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_two_ranks(script: str, output_dir: Path, timeout: int) -> None:
    """torchrun this folder's `script` on 2 processes with `output_dir` as its argument; fail with its stderr."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(Path(__file__).with_name(script)), str(output_dir),
    ]  # fmt: skip
    # a session of its own, so a hung run is ended with its workers, not just the launcher
    launcher = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        raise
    assert launcher.returncode == 0, stderr[-4000:]


@pytest.mark.multiprocess
def test_ddp_counts_are_summed_over_ranks(tmp_path):
    run_on_two_ranks("ddp_worker.py", tmp_path, timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 and r["ddp"] == "DistributedDataParallel" for r in ranks)
    assert all(r["process_group_destroyed"] for r in ranks)
    (log0,), (log1,) = ranks[0]["logs"], ranks[1]["logs"]
    for layer in range(2):
        per_rank = [torch.tensor(r["local_counts"][layer]) for r in ranks]
        # the ranks saw different data, so a rank-0-only count would not pass
        assert not torch.equal(per_rank[0], per_rank[1])
        total = per_rank[0] + per_rank[1]
        logged = torch.tensor([log0[f"moe/layer_{layer:02d}/token_fraction_expert_{e:02d}"] for e in range(4)])
        torch.testing.assert_close(logged, (total / total.sum()).float())
        # 2 ranks x 2 steps x 2 micro-batches x 2 sequences x 12 tokens; each token has 2 experts
        assert log0[f"moe/layer_{layer:02d}/tokens"] == 2 * 2 * 2 * 2 * 12 == total.sum().item() / 2
        # every rank logs the same reduced numbers
        assert log1[f"moe/layer_{layer:02d}/load_imbalance"] == log0[f"moe/layer_{layer:02d}/load_imbalance"]


@pytest.mark.multiprocess
def test_router_loss_gradient_is_the_same_for_every_split_over_ranks_and_micro_batches(tmp_path):
    """The 8 combinations of {1 process, 2 DDP ranks} x average_tokens_across_devices {True, False} x gradient
    accumulation {1, 4}: the router-loss part of one step's gradient is the same (tests/training/router_loss_scaling.py)."""
    from tests.training.router_loss_scaling import SETTINGS, router_loss_contributions

    run_on_two_ranks("router_loss_scaling.py", tmp_path, timeout=300)
    ddp = torch.load(tmp_path / "contributions_rank0.pt")
    single = router_loss_contributions(str(tmp_path / "single"))
    reference = single[(True, 1)]  # one process, the whole batch in one forward
    # the router losses reach the routers (and, through the routing, more): a zero contribution would pass trivially
    assert max(grad.abs().max().item() for grad in reference.values()) > 1e-3
    for runs, name in ((single, "1 process"), (ddp, "2 DDP ranks")):
        for average_tokens, accumulation in SETTINGS:
            contribution = runs[(average_tokens, accumulation)]
            assert contribution.keys() == reference.keys()
            where = f"{name}, average_tokens_across_devices={average_tokens}, accumulation {accumulation}"
            for parameter, grad in reference.items():
                torch.testing.assert_close(
                    contribution[parameter],
                    grad,
                    rtol=1e-4,
                    atol=1e-6,
                    msg=lambda m, w=f"{where}, {parameter}": f"{w}: {m}",
                )
