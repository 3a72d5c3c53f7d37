"""Routers balanced once per optimizer step under `MoeTrainer`, for the 2-rank test (test_ddp.py): aux-loss-free
expert-bias balancing (`router_bias_update_rate`) and the global-batch balance loss (`aux_loss_scope="global_batch"`).

Run directly (one process: the references, called from the test) or under torchrun (2 DDP ranks: every run, one
file per rank). Every run reads the same 8 sequences per optimizer step in dataset order
(`train_sampling_strategy="sequential"`); accelerate deals per-rank batches round-robin, so rank r's micro-batch m
is half r of the one process's micro-batch m (the run records its input ids, the test checks that layout).

What a run records, per MoE layer and forward (a hook on the block's `RouterLosses`, which receives the routing
decision): this forward's (token, expert) selections counted apart from the library (`bincount`), the balance loss
value, and the global-batch loads the loss module holds after the forward; per optimizer step: every router's
`expert_bias` after `RouterBalancingCallback` moved it; and the gradient just before the optimizer step.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
from transformers import TrainerCallback

import hf_moe
from tests.training.helpers import causal_examples, tiny_gpt2, training_args
from tests.training.router_loss_scaling import GradientsBeforeStep

SEQUENCES_PER_STEP = 8
BIAS_RATE = 0.01
BIAS_STEPS = 3
# (accumulation, sync_each_batch): with sync_each_batch DDP copies rank 0's buffers onto rank 1 at the start of every
# micro-batch, not only of each step's first: the routers' loads must be drained after every micro-batch
BIAS_SETTINGS = ((1, False), (4, False), (4, True))
GLOBAL_BATCH_ACCUMULATION = 4
GLOBAL_BATCH_STEPS = 2


class StepRecorder(TrainerCallback):
    """Per forward and layer: selections, balance loss, global-batch loads; per step: the expert biases."""

    def __init__(self, model):
        self.blocks = [block for _, block in hf_moe.training.moe_blocks(model)]
        self.forwards: list[dict] = []  # one entry per training forward of the model
        self.biases: list[list[torch.Tensor]] = []  # per optimizer step, per layer
        for index, block in enumerate(self.blocks):
            block.losses.register_forward_hook(self._hook(index))
        model.transformer.wte.register_forward_pre_hook(self._input_ids)

    def _input_ids(self, module, inputs):
        self.forwards.append({"input_ids": inputs[0].clone(), "layers": [None] * len(self.blocks)})

    def _hook(self, index):
        def hook(module, inputs, output):
            decision, _, token_mask_T = inputs[:3]
            selected_N = decision.top_k_index_TK.reshape(-1)
            if token_mask_T is not None:  # these runs have no padding, but a mask would count it out
                selected_N = selected_N[token_mask_T.repeat_interleave(decision.top_k_index_TK.shape[-1]).bool()]
            entry = {
                "selections": torch.bincount(selected_N, minlength=module.num_experts).double(),
                "balance": output.balance_loss.detach().clone(),
            }
            if module.scope == "global_batch":
                entry["global_assignments"] = module.global_assignments_per_expert.double().clone()
                entry["global_slots"] = module.global_slots.double().clone()
            self.forwards[-1]["layers"][index] = entry

        return hook

    def on_step_end(self, args, state, control, **kwargs):
        # after on_optimizer_step, where RouterBalancingCallback moved the biases
        self.biases.append(
            [block.router.expert_bias.clone() for block in self.blocks if block.router.balances_with_bias]
        )


def train(output_dir: str, accumulation: int, steps: int, sync_each_batch: bool = False, **config) -> dict:
    """`steps` optimizer steps of `MoeTrainer` over 8 sequences each, split over this run's ranks and micro-batches."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    # a wide router init keeps top-k choices away from ties, which the ~1e-7 summation-order differences of DDP's
    # gradient average could flip after a step
    model = tiny_gpt2(router_init_std=0.5, **config)
    recorder, gradients = StepRecorder(model), GradientsBeforeStep(model)
    args = training_args(
        output_dir,
        max_steps=steps,
        per_device_train_batch_size=SEQUENCES_PER_STEP // world_size // accumulation,
        gradient_accumulation_steps=accumulation,
        train_sampling_strategy="sequential",
        max_grad_norm=0.0,  # the raw gradient is compared
        accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": sync_each_batch}},
    )
    trainer = hf_moe.MoeTrainer(
        model=model,
        args=args,
        train_dataset=causal_examples(SEQUENCES_PER_STEP * steps),
        callbacks=[recorder, gradients],
    )
    trainer.train()
    return {"forwards": recorder.forwards, "biases": recorder.biases, "last_gradients": gradients.grads}


def bias_runs(output_dir: str) -> dict:
    """(accumulation, sync_each_batch) -> the run with expert-bias balancing (no balance loss: the bias balances)."""
    return {
        (accumulation, sync): train(output_dir, accumulation, BIAS_STEPS, sync, router_bias_update_rate=BIAS_RATE)
        for accumulation, sync in BIAS_SETTINGS
    }


def global_batch_runs(output_dir: str) -> dict:
    """The global-batch balance loss in one step without accumulation, with coefficient 1 and 0 (their gradients'
    difference is the loss's part), and over 2 steps of 4 micro-batches (the running loads and their reset)."""
    losses = dict(aux_loss_scope="global_batch", router_z_loss_coef=0.0)
    return {
        "coef_1": train(output_dir, 1, 1, router_aux_loss_coef=1.0, **losses),
        "coef_0": train(output_dir, 1, 1, router_aux_loss_coef=0.0, **losses),
        "accumulated": train(
            output_dir, GLOBAL_BATCH_ACCUMULATION, GLOBAL_BATCH_STEPS, router_aux_loss_coef=1.0, **losses
        ),
    }


def micro_batch_split_runs(output_dir: str) -> dict:
    """The micro-batch balance loss on one process, 2 micro-batches of one step, coefficient 1 and 0: what each DDP
    rank would compute if the global batch's loads were not summed over ranks."""
    losses = dict(aux_loss_scope="micro_batch", router_z_loss_coef=0.0)
    return {f"coef_{c}": train(output_dir, 2, 1, router_aux_loss_coef=float(c), **losses) for c in (1, 0)}


if __name__ == "__main__":
    result = {"bias": bias_runs(sys.argv[1]), "global_batch": global_batch_runs(sys.argv[1])}
    rank = torch.distributed.get_rank()
    torch.save(result, os.path.join(sys.argv[1], f"balancing_rank{rank}.pt"))
    # the DDP models must be freed while the process group is alive (see ddp_worker.py)
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
