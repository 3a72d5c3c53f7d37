"""Step time per token: one process vs 2 expert-parallel ranks (CPU, gloo), a small GPT-2 MoE, fp32 fwd+bwd+SGD.

One process trains on B sequences per step; under `DistributedConfig(fsdp_size=2, ep_size=2)` each of 2 ranks
trains on its own B sequences (2B tokens per step in all) and holds E/2 experts. The ratio printed is
(EP time per token) / (single time per token): below 1 is a speed-up. On a 2-core machine both ranks share the
cores that the single process had to itself, so expect ~1 or above here; the point is the overhead measured.

Scaling estimate to 8 GPUs (ep_size=8, fsdp_size=8, one node), per MoE layer and step, from the all-to-all sizes
of transformers' `AllToAllEP`: each rank sends T*K token rows of D values (minus the 1/8 that stay local) in the
dispatch and receives as many back in the combine, forward, and the same again in backward:

    bytes per rank per layer = 4 (dispatch + combine, fwd + bwd) * T*K*(7/8) * D * bytes_per_value

GPT-2-small shapes (D=768, K=2, T=8192 tokens per rank, bf16): 4 * 8192*2*0.875 * 768 * 2 B = 88 MB per layer,
1.06 GB for 12 MoE layers. On NVLink (~150 GB/s achieved all-to-all bandwidth per GPU) that is ~7 ms per step,
against ~12 * 2 * 2*T*K*D*F*3 = 12 * 2 * 2*8192*2*768*3072*3 FLOPs ~= 5.6 TFLOP of expert compute (fwd+bwd),
~15 ms at 400 TFLOP/s: communication is about half of expert compute, so overlapping it (or fewer, larger
experts per rank) decides the efficiency; across nodes (~25 GB/s per GPU on 200 Gb/s IB) it would dominate,
which is why transformers keeps the ep group inside a node (efsdp replicates experts across nodes).
FSDP2 adds an all-gather of the dense weights (forward, backward) and a reduce-scatter of their gradients,
independent of T; the experts are not all-gathered when efsdp_size == 1.

    python benchmarks/expert_parallel.py [--steps 6 --batch 8 --seq 64]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hf_moe


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warmup steps)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per process and step")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    return parser.parse_args(argv)


def _time_steps(model, args, rank: int) -> float:
    """Seconds per step, fwd + bwd + SGD, median of the timed steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    times = []
    for step in range(args.steps + 2):
        ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=generator)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _ep_rank(rank: int, port: int, folder: str, args, result_path: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        from transformers.distributed import DistributedConfig

        layout = DistributedConfig(fsdp_size=2, ep_size=2)
        model = hf_moe.GPT2MoeForCausalLM.from_pretrained(folder, distributed_config=layout).train()
        seconds = torch.tensor(_time_steps(model, args, rank))
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
        if rank == 0:
            torch.save(seconds, result_path)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = hf_moe.GPT2MoeConfig(
            vocab_size=512,
            n_positions=args.seq,
            n_embd=args.hidden,
            n_layer=2,
            n_head=4,
            num_experts=args.experts,
            bos_token_id=0,
            eos_token_id=0,
        )
        folder = os.path.join(tmp, "model")
        hf_moe.GPT2MoeForCausalLM(config).save_pretrained(folder)

        # one process, one thread: what each EP rank gets on a 2-core machine
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        single = _time_steps(hf_moe.GPT2MoeForCausalLM.from_pretrained(folder).train(), args, rank=0)
        torch.set_num_threads(threads)

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        result_path = os.path.join(tmp, "ep.pt")
        mp.start_processes(_ep_rank, args=(port, folder, args, result_path), nprocs=2, start_method="spawn")
        ep = float(torch.load(result_path))

    tokens = args.batch * args.seq
    result = {
        "single_ms_per_token": 1e3 * single / tokens,
        "ep2_ms_per_token": 1e3 * ep / (2 * tokens),
    }
    result["ep2_over_single"] = result["ep2_ms_per_token"] / result["single_ms_per_token"]
    print(
        f"tokens/step/process={tokens} D={args.hidden} E={args.experts}: single {result['single_ms_per_token']:.4f} "
        f"ms/token, 2 EP ranks {result['ep2_ms_per_token']:.4f} ms/token, ratio {result['ep2_over_single']:.2f}"
    )
    return result


if __name__ == "__main__":
    main()
