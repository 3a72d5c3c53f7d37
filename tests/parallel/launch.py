"""Run a function on N CPU processes with gloo, the way torchrun would (RANK / WORLD_SIZE / MASTER_* set), with a
free port, a timeout on the whole run and on every collective, and a clean `destroy_process_group` on every rank."""

from __future__ import annotations

import gc
import os
import socket
import sys
import time
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

# `accelerate launch` arguments that really start 2 processes on a CPU-only machine (the README's recipe): `--cpu`
# instead of `--multi_gpu` would pick accelerate's simple launcher, which starts ONE process
ACCELERATE_TWO_PROCESSES = [
    "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
    "--dynamo_backend", "no",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    # initialized here, not by transformers, so that a stuck collective fails after 90 s instead of 2 hours
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=90))
    try:
        fn(rank, world_size, *args)
        # Free the worker's models (DTensors, FSDP state) while the process group is alive, not at interpreter exit,
        # where gloo's threads can abort the process; and let nobody tear down its connections while another rank may
        # still be talking to it.
        gc.collect()
        dist.barrier()
        _stage(rank, "passed its checks")
    finally:
        dist.destroy_process_group()
    _stage(rank, "destroyed its process group")


def _stage(rank: int, what: str) -> None:
    # shown with a failing test's output: tells a crash in the checks from one while shutting down
    print(f"[rank {rank}] {what}", file=sys.stderr, flush=True)


def run_distributed(fn, *args, world_size: int = 2, timeout: float = 150.0) -> None:
    """Run `fn(rank, world_size, *args)` on `world_size` processes; re-raise a worker's failure, fail on timeout."""
    context = mp.start_processes(
        _entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} did not finish on {world_size} processes within {timeout} s")
