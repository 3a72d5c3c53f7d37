"""`MoeLoss`: a `compute_loss_func` for `Trainer` that keeps the router losses in the loss.

When `Trainer` computes the loss itself (`label_smoothing_factor > 0`, or a `compute_loss_func`), it pops the labels
and calls the model without them, so the model's own loss, which adds the router losses, is never computed. `MoeLoss`
is that loss again, from the outputs (Colossal-AI's `MoeLoss(aux_weight, loss_fn)` idea):

    loss = base(outputs, labels) + share * (router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss)

with `base` transformers' `LabelSmoother` (labels shifted for a decoder-only model, as its own loss shifts them) or a
function of yours, and `share` the micro-batch's share of the labels under gradient accumulation, exactly as the
model's own loss weighs them. `MoeTrainer` uses it automatically; with a plain `Trainer` pass
`compute_loss_func=MoeLoss(model, label_smoothing=...)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.trainer_pt_utils import LabelSmoother

from ..modeling.losses import accumulation_share

__all__ = ["MoeLoss"]


class MoeLoss:
    """`compute_loss_func(outputs, labels, num_items_in_batch)`: the LM loss plus the model's weighted router losses.

    Args:
        model: the hf_moe model (or a PEFT wrapper of one). Its config gives the coefficients; labels are shifted for
            a causal LM (GPT-2), not for T5 or a classifier. `MoeLoss` sets `config.output_router_logits=True`, so
            the model returns its router losses when called without labels.
        label_smoothing: the label-smoothing factor of the cross-entropy (0: plain cross-entropy).
        base_loss: instead of the cross-entropy, your own `(outputs, labels, num_items_in_batch) -> loss`; the router
            losses are added to it.
    """

    def __init__(self, model, label_smoothing: float = 0.0, base_loss: Callable | None = None):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        config = model.config
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not hasattr(config, name):
                raise TypeError(f"MoeLoss needs an hf_moe model (its config has {name}); got {type(model).__name__}")
        self.aux_coef = config.aux_loss_coef
        self.z_coef = config.router_z_loss_coef
        # shifted like the model's own loss: a causal LM predicts the next token (T5 and classifiers: not shifted)
        self.shift_labels = getattr(model, "loss_type", None) == "ForCausalLM" and not config.is_encoder_decoder
        self.label_smoother = LabelSmoother(epsilon=label_smoothing)
        self.base_loss = base_loss
        config.output_router_logits = True

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        if labels is None:
            raise ValueError("MoeLoss needs the labels (Trainer passes them when the batch has a `labels` column)")
        if self.base_loss is not None:
            loss = self.base_loss(outputs, labels, num_items_in_batch=num_items_in_batch)
        else:
            loss = self.label_smoother(
                outputs, labels, shift_labels=self.shift_labels, num_items_in_batch=num_items_in_batch
            )
        targets = labels[..., 1:] if self.shift_labels else labels
        share = accumulation_share(targets.ne(self.label_smoother.ignore_index).sum(), num_items_in_batch)
        for name, coef in (("aux_loss", self.aux_coef), ("z_loss", self.z_coef)):
            router_loss = outputs.get(name)
            if router_loss is None:
                if coef == 0:
                    continue
                raise ValueError(
                    f"the model returned no {name}: it returns router losses without labels only with "
                    "output_router_logits=True (MoeLoss sets that on the config it was given; was it another model?)"
                )
            loss = loss + coef * share * router_loss.to(loss.device)
        return loss
