"""One rank of the 2-process DDP test (started by torchrun from test_ddp.py); writes its findings as JSON.

DDP keeps its default `broadcast_buffers=True` and the run accumulates gradients over 2 micro-batches, the setting in
which reading the blocks' buffers once per logging window would count rank 0 only.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
from transformers import Trainer

import hf_moe
from tests.training.helpers import RoutingRecorder, causal_examples, tiny_gpt2, training_args


def main(output_dir: str) -> None:
    result = train_and_record(output_dir)
    # The DDP model is gone once train_and_record returns: freed after destroy_process_group, its reducer would destroy
    # the gloo process group while holding the GIL and can deadlock against gloo's own threads (pytorch#56297).
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    result["process_group_destroyed"] = not torch.distributed.is_initialized()
    with open(os.path.join(output_dir, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)


def train_and_record(output_dir: str) -> dict:
    torch.manual_seed(0)
    model = tiny_gpt2(capacity_factor=1.0)
    recorder = RoutingRecorder(model)
    args = training_args(
        output_dir, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2, logging_steps=2
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=causal_examples(32),
        callbacks=[hf_moe.LoadBalanceCallback(save_plots=False)],
    )
    trainer.train()
    rank = torch.distributed.get_rank()
    world_size = torch.distributed.get_world_size()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {
        "rank": rank,
        "world_size": world_size,
        "ddp": type(trainer.model_wrapped).__name__,
        "local_counts": [c.tolist() for c in recorder.take(training=True)],
        "logs": logs,
    }


if __name__ == "__main__":
    main(sys.argv[1])
