"""2-process data-parallel runs (torchrun, gloo on CPU) against one process: the logged counts are the sum of the
per-rank counts, the router losses' gradient does not depend on the split, and routers balanced once per optimizer
step (expert bias, global-batch balance loss) see the loads of every rank and micro-batch of the step."""

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


@pytest.fixture(scope="module")
def balancing_runs(tmp_path_factory):
    """One 2-rank launch of router_balancing_ddp.py (every DDP run), and the one-process references."""
    from tests.training import router_balancing_ddp as worker

    folder = tmp_path_factory.mktemp("balancing")
    run_on_two_ranks("router_balancing_ddp.py", folder, timeout=300)
    ddp = [torch.load(folder / f"balancing_rank{rank}.pt") for rank in range(2)]
    single = {
        "bias": worker.bias_runs(str(folder / "single")),
        "global_batch": worker.global_batch_runs(str(folder / "single")),
        "micro_batch_split": worker.micro_batch_split_runs(str(folder / "single")),
    }
    return ddp, single


def _steps(run: dict, accumulation: int) -> list[list[dict]]:
    """The run's recorded forwards, grouped by optimizer step."""
    forwards = run["forwards"]
    return [forwards[start : start + accumulation] for start in range(0, len(forwards), accumulation)]


def _assert_micro_batches_are_halves(ranks: list[dict], single: dict) -> None:
    # the layout the comparisons rest on: rank r's micro-batch m is half r of the one process's micro-batch m
    assert len(ranks[0]["forwards"]) == len(single["forwards"])
    for rank, run in enumerate(ranks):
        for forward, reference in zip(run["forwards"], single["forwards"], strict=True):
            assert torch.equal(forward["input_ids"], reference["input_ids"].chunk(2)[rank])


def _selections(forwards: list[dict], layer: int) -> torch.Tensor:
    return sum(forward["layers"][layer]["selections"] for forward in forwards)


@pytest.mark.multiprocess
def test_expert_bias_moves_the_same_on_two_ranks_as_on_one_process(balancing_runs):
    from tests.training.router_balancing_ddp import BIAS_RATE, BIAS_SETTINGS, BIAS_STEPS

    ddp, single = balancing_runs
    reference = single["bias"][(1, False)]  # one process, each step's 8 sequences in one forward
    num_layers = len(reference["biases"][0])
    # the reference follows bias += rate * sign(mean load - load), the loads counted apart from the library
    bias = [torch.zeros_like(b) for b in reference["biases"][0]]
    for step, forwards in enumerate(_steps(reference, 1)):
        for layer in range(num_layers):
            load = _selections(forwards, layer)
            bias[layer] = bias[layer] + BIAS_RATE * torch.sign(load.mean() - load).float()
            torch.testing.assert_close(reference["biases"][step][layer], bias[layer], rtol=0, atol=1e-7)
    assert all(b.abs().max() > 0 for b in bias), "a bias never moved"
    # a rank that updated its biases from its own loads would move differently: the test can tell
    local_differs = False
    for accumulation, sync in BIAS_SETTINGS:
        ranks = [result["bias"][(accumulation, sync)] for result in ddp]
        _assert_micro_batches_are_halves(ranks, single["bias"][(accumulation, sync)])
        for step in range(BIAS_STEPS):
            for layer in range(num_layers):
                where = f"accumulation {accumulation}, sync_each_batch={sync}, step {step + 1}, layer {layer}"
                expected = reference["biases"][step][layer]
                # exactly: the biases are sums of +-rate, the loads whole numbers
                assert torch.equal(single["bias"][(accumulation, sync)]["biases"][step][layer], expected), where
                assert all(torch.equal(run["biases"][step][layer], expected) for run in ranks), where
                local_E = _selections(_steps(ranks[0], accumulation)[step], layer)
                total_E = sum(_selections(_steps(run, accumulation)[step], layer) for run in ranks)
                assert torch.equal(total_E, _selections(_steps(reference, 1)[step], layer)), where
                local_differs |= not torch.equal(
                    torch.sign(local_E.mean() - local_E), torch.sign(total_E.mean() - total_E)
                )
    assert local_differs


@pytest.mark.multiprocess
def test_global_batch_balance_loss_counts_every_rank_and_micro_batch_of_a_step(balancing_runs):
    from tests.training.router_balancing_ddp import GLOBAL_BATCH_ACCUMULATION as ACCUMULATION

    ddp, single = balancing_runs
    ranks = [result["global_batch"]["coef_1"] for result in ddp]
    reference = single["global_batch"]["coef_1"]  # one process, the step's 8 sequences in one forward
    _assert_micro_batches_are_halves(ranks, reference)
    (reference_forward,) = reference["forwards"]
    for layer, expected in enumerate(reference_forward["layers"]):
        per_rank = [run["forwards"][0]["layers"][layer] for run in ranks]
        assert not torch.equal(per_rank[0]["selections"], per_rank[1]["selections"])  # a local f would differ
        for entry in per_rank:  # f_e: the loads of both ranks
            assert torch.equal(entry["global_assignments"], expected["selections"])
            assert entry["global_slots"] == expected["selections"].sum()
        # E * sum_e f_e * P_e with a global f and each rank's own P: with equal tokens per rank (no padding here) the
        # mean of the ranks' P is the whole batch's P, so the mean of the ranks' losses is the one process's loss
        torch.testing.assert_close(sum(e["balance"] for e in per_rank) / 2, expected["balance"], rtol=1e-5, atol=0)

    # and so is the loss's gradient: DDP averages the ranks' gradients, each of E * sum_e f_e * P_e(rank)
    def contribution(runs: dict) -> dict:
        with_loss, without = runs["coef_1"]["last_gradients"], runs["coef_0"]["last_gradients"]
        return {name: with_loss[name] - without[name] for name in with_loss}

    expected_grads = contribution(single["global_batch"])
    assert max(grad.abs().max().item() for grad in expected_grads.values()) > 1e-2
    ddp_grads = contribution(ddp[0]["global_batch"])
    assert ddp_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # the split the global batch undoes: the micro-batch loss on the two halves gives another gradient
    split = contribution(single["micro_batch_split"])
    assert max((split[n] - g).abs().max().item() for n, g in expected_grads.items()) > 1e-3

    # 4 micro-batches a step: micro-batch m sees the loads of micro-batches 1..m of its step on both ranks
    ranks = [result["global_batch"]["accumulated"] for result in ddp]
    reference = single["global_batch"]["accumulated"]
    _assert_micro_batches_are_halves(ranks, reference)
    for step, reference_forwards in enumerate(_steps(reference, ACCUMULATION)):
        rank_forwards = [_steps(run, ACCUMULATION)[step] for run in ranks]
        for layer in range(len(reference_forwards[0]["layers"])):
            for m in range(ACCUMULATION):
                where = f"step {step + 1}, micro-batch {m + 1}, layer {layer}"
                seen_E = sum(_selections(forwards[: m + 1], layer) for forwards in rank_forwards)
                assert torch.equal(seen_E, _selections(reference_forwards[: m + 1], layer)), where
                for entry in [forwards[m]["layers"][layer] for forwards in rank_forwards + [reference_forwards]]:
                    assert torch.equal(entry["global_assignments"], seen_E), where
                    assert entry["global_slots"] == seen_E.sum(), where
                means = sum(forwards[m]["layers"][layer]["balance"] for forwards in rank_forwards) / 2
                torch.testing.assert_close(means, reference_forwards[m]["layers"][layer]["balance"], rtol=1e-5, atol=0)
            # spelled out: the last micro-batch's f is the whole step's, the first one's its own micro-batch's
            last, first = reference_forwards[-1]["layers"][layer], reference_forwards[0]["layers"][layer]
            step_E = _selections(reference_forwards, layer)
            torch.testing.assert_close(last["global_assignments"] / last["global_slots"], step_E / step_E.sum())
            assert torch.equal(first["global_assignments"], first["selections"]), f"step {step + 1}: not reset"
