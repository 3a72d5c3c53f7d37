"""`perplexity(model, data)`: token-level perplexity of a causal or seq2seq language model.

The model's `loss` is not used: an MoE model's loss includes the router losses, and a mean of per-batch means
weighs short batches too much. Perplexity here is exp(sum of token NLLs / number of target tokens), from the logits.
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

__all__ = ["perplexity"]


def _as_dataloader(data, batch_size: int, data_collator) -> Iterable:
    if isinstance(data, DataLoader):
        return data
    return DataLoader(data, batch_size=batch_size, collate_fn=data_collator or default_data_collator)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    data,
    *,
    batch_size: int = 8,
    data_collator=None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> float:
    """Perplexity of `model` over `data` (a DataLoader, or a dataset of tokenized examples batched here).

    Causal models: batches need `input_ids` (and usually `attention_mask`); without `labels`, every non-padding
    token after the first is a target. Seq2seq models (`config.is_encoder_decoder`): batches need `labels`
    (-100 ignored). Runs in eval mode (restored afterwards) and leaves the MoE blocks' load counters as they were,
    so a perplexity pass does not show up in `LoadBalanceCallback`'s training metrics.
    """
    is_seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    accepted = set(inspect.signature(model.forward).parameters)
    counters = [{name: getattr(block, name).clone() for name in block.COUNTERS} for _, block in moe_blocks(model)]
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
                    raise ValueError("perplexity of a seq2seq model needs `labels` in every batch")
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
        for (_, block), saved in zip(moe_blocks(model), counters, strict=True):
            for name, value in saved.items():
                getattr(block, name).copy_(value)
    if num_targets == 0:
        raise ValueError("perplexity: the data has no target tokens (all labels are -100 or padding)")
    return math.exp(nll_sum / num_targets)
