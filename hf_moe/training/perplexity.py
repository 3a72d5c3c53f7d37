"""`language_model_loss(model, data)` and `perplexity(model, data)` of a causal or seq2seq language model.

The model's `loss` is not used: an MoE model's loss includes the router losses, and a mean of per-batch means
weighs short batches too much. The loss here is the sum of token NLLs / number of target tokens, from the logits, so
a dense model and its MoE upcycle compare directly; the perplexity is exp(loss).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator

from .load_balance import moe_blocks

__all__ = ["language_model_loss", "perplexity"]


def _as_dataloader(data, batch_size: int, data_collator) -> Iterable:
    if isinstance(data, DataLoader):
        return data
    # a generator of its own: iterating a DataLoader draws a seed from its generator, which would otherwise be the
    # global one, and an evaluation pass in the middle of training would change the dropout masks that follow
    return DataLoader(
        data, batch_size=batch_size, collate_fn=data_collator or default_data_collator, generator=torch.Generator()
    )


@torch.no_grad()
def language_model_loss(
    model: nn.Module,
    data,
    *,
    batch_size: int = 8,
    data_collator=None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    count_routing: bool = False,
) -> float:
    """Mean cross-entropy per target token (nats) of `model` over `data`, without the router losses.

    `data` is a DataLoader, or a dataset (or list) of tokenized examples batched here with `data_collator`.
    Causal models: batches need `input_ids` (and usually `attention_mask`); without `labels`, every non-padding
    token after the first is a target. Seq2seq models (`config.is_encoder_decoder`): batches need `labels`
    (-100 ignored). Runs in eval mode (restored afterwards). The MoE blocks' load counters are left as they were, so
    an evaluation pass does not show up in `LoadBalanceCallback`'s training metrics; `count_routing=True` adds this
    pass's routing to them instead (to measure the load balance on this data without a second pass). Batched here,
    the data is read in order and the global random stream is not touched, so evaluating during training does not
    change the training.
    """
    is_seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    accepted = set(inspect.signature(model.forward).parameters)
    saved_counters = (
        []
        if count_routing
        else [{name: getattr(block, name).clone() for name in block.COUNTERS} for _, block in moe_blocks(model)]
    )
    was_training = model.training
    model.eval()
    nll_sum, num_targets = 0.0, 0
    try:
        for index, batch in enumerate(_as_dataloader(data, batch_size, data_collator)):
            if max_batches is not None and index >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items() if k in accepted and isinstance(v, torch.Tensor)}
            labels = batch.pop("labels", None)
            if is_seq2seq:
                if labels is None:
                    raise ValueError("the loss of a seq2seq model needs `labels` in every batch")
                # labels make the model build decoder_input_ids (shift right); its loss is ignored below
                logits = model(**batch, labels=labels).logits
                targets = labels
            else:
                if labels is None:
                    labels = batch["input_ids"].clone()
                    if "attention_mask" in batch:
                        labels[batch["attention_mask"] == 0] = -100
                logits = model(**batch).logits[:, :-1]
                targets = labels[:, 1:]
            nll_sum += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100, reduction="sum"
            ).item()
            num_targets += int(targets.ne(-100).sum().item())
    finally:
        model.train(was_training)
        if not count_routing:
            for (_, block), saved in zip(moe_blocks(model), saved_counters, strict=True):
                for name, value in saved.items():
                    getattr(block, name).copy_(value)
    if num_targets == 0:
        raise ValueError("the data has no target tokens (all labels are -100 or padding)")
    return nll_sum / num_targets


def perplexity(
    model: nn.Module,
    data,
    *,
    batch_size: int = 8,
    data_collator=None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> float:
    """exp(`language_model_loss`): the perplexity of `model` over `data` (same arguments, counters left alone)."""
    return math.exp(
        language_model_loss(
            model, data, batch_size=batch_size, data_collator=data_collator, device=device, max_batches=max_batches
        )
    )
