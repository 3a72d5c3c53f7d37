"""Gradient accumulation through Trainer: GA=2 with half batches gives GA=1's loss and gradients, router losses included.

The load-balancing loss is not additive over tokens, so the batch repeats one half ([a, b, a, b]): then each
micro-batch's router losses equal the full batch's, and the only way to differ is to weigh them wrongly across
micro-batches (e.g. adding them once per micro-batch: twice the router-loss gradient).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback

from .helpers import causal_examples, seq2seq_examples, tiny_gpt2, tiny_t5, training_args


class SequentialTrainer(Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


class GradCapture(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def one_step(model_fn, examples, tmp_path, batch_size: int, accumulation: int):
    torch.manual_seed(0)
    model = model_fn()
    capture = GradCapture()
    args = training_args(
        tmp_path / f"ga{accumulation}",
        max_steps=1,
        logging_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=0.0,
    )
    trainer = SequentialTrainer(model=model, args=args, train_dataset=examples, callbacks=[capture])
    trainer.train()
    return trainer.state.log_history[0]["loss"], capture.grads


FAMILIES = {
    # a large coefficient, so a misweighted router loss is far outside the tolerance
    "gpt2": (
        lambda **kw: tiny_gpt2(**{"router_aux_loss_coef": 1.0, "router_z_loss_coef": 0.1, **kw}),
        causal_examples,
    ),
    "t5": (lambda **kw: tiny_t5(**{"router_aux_loss_coef": 1.0, "router_z_loss_coef": 0.1, **kw}), seq2seq_examples),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_accumulation_gives_the_full_batch_loss_and_gradients(family, tmp_path):
    model_fn, make_examples = FAMILIES[family]
    a, b = make_examples(2)
    examples = [a, b, a, b]
    loss_full, grads_full = one_step(model_fn, examples, tmp_path, batch_size=4, accumulation=1)
    loss_acc, grads_acc = one_step(model_fn, examples, tmp_path, batch_size=2, accumulation=2)
    assert loss_acc == pytest.approx(loss_full, rel=1e-5)
    assert grads_full.keys() == grads_acc.keys()
    for name, grad in grads_full.items():
        # relative to the tensor's scale: fp32 summation order differs, so tiny entries differ in relative terms
        error = (grads_acc[name] - grad).abs().max().item()
        assert error <= 1e-4 * grad.abs().max().item() + 1e-8, (name, error)
    # the router losses matter here: without them the loss is visibly different
    loss_plain, _ = one_step(
        lambda: model_fn(router_aux_loss_coef=0.0, router_z_loss_coef=0.0), examples, tmp_path, 4, 1
    )
    assert abs(loss_full - loss_plain) > 1e-2
