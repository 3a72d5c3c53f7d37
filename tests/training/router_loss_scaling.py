"""The router-loss part of one optimizer step's gradient under `Trainer`, for the scaling test (test_ddp.py).

Run directly (one process) or under torchrun (2 DDP ranks). For every setting of `average_tokens_across_devices` and
`gradient_accumulation_steps` it trains one optimizer step over the same 8 sequences (the whole dataset: 8 per step
on one process, 4 per rank on two) twice from the same init, with router_z_loss_coef 1 and 0, and records the
difference of the gradients just before the optimizer step: the router losses' contribution (transformers#48690: it
was scaled by the world size with average_tokens_across_devices=True).

The z-loss is a mean over tokens, so with equal tokens per micro-batch its full-batch value is the mean of any split's
values: the contribution must not depend on how the 8 sequences are split over ranks and micro-batches. (The
balance loss is not linear in the tokens: its micro-batch value depends on the split by design; aux_loss_coef is 0.)
"""

from __future__ import annotations

import itertools
import os
import sys

import torch
from transformers import Trainer, TrainerCallback

from tests.training.helpers import causal_examples, tiny_gpt2, training_args

SEQUENCES = 8
SETTINGS = list(itertools.product((True, False), (1, 4)))  # (average_tokens_across_devices, accumulation steps)


class GradientsBeforeStep(TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}


def step_gradients(output_dir: str, z_loss_coef: float, average_tokens: bool, accumulation: int) -> dict:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    model = tiny_gpt2(router_aux_loss_coef=0.0, router_z_loss_coef=z_loss_coef, router_init_std=0.5)
    recorder = GradientsBeforeStep(model)
    args = training_args(
        output_dir,
        max_steps=1,
        per_device_train_batch_size=SEQUENCES // world_size // accumulation,
        gradient_accumulation_steps=accumulation,
        average_tokens_across_devices=average_tokens,
        max_grad_norm=0.0,  # no clipping: the raw gradient is compared
        logging_steps=1,
    )
    Trainer(model=model, args=args, train_dataset=causal_examples(SEQUENCES), callbacks=[recorder]).train()
    return recorder.grads


def router_loss_contributions(output_dir: str) -> dict:
    """(average_tokens, accumulation) -> name -> the gradient's router-loss part."""
    contributions = {}
    for average_tokens, accumulation in SETTINGS:
        with_loss = step_gradients(output_dir, 1.0, average_tokens, accumulation)
        without = step_gradients(output_dir, 0.0, average_tokens, accumulation)
        contributions[(average_tokens, accumulation)] = {n: with_loss[n] - without[n] for n in with_loss}
    return contributions


if __name__ == "__main__":
    result = router_loss_contributions(sys.argv[1])
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save(result, os.path.join(sys.argv[1], f"contributions_rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
