"""`MoeSFTTrainer` and `MoeDPOTrainer`: TRL's SFT and DPO trainers for hf_moe models, with the model's own router
losses in the loss and what `MoeTrainer` adds (load-balance callbacks first, once-per-step router balancing,
optimizer presets, expert-parallel checkpoints). Needs `trl` (`pip install "hf-moe[trl]"`).

Why TRL's trainers alone are not enough: TRL 1.x computes its losses through a fused LM head it patches onto the
model (`trl.trainer.utils.add_fused_lm_head`). The patched forward runs the backbone (`model.base_model`) and scores
only the label positions, so the model's own forward, which adds the router losses, never runs. For MoE models TRL
adds Mixtral's top-k load-balancing loss of the router logits instead, weighted by the config's
`router_aux_loss_coef`. That is not an hf_moe model's loss (each router's registered balance loss, hash routers
with none, the z-loss, `aux_loss_scope`), and with hf_moe's default `router_aux_loss_coef=None` (the router's
default) TRL fails with a TypeError.

So these trainers switch TRL's auxiliary loss off and add the model's: they ask the backbone for every MoE layer's
losses, read them from the backbone's output with a forward hook (TRL's fused head returns per-token log
probabilities only), and add

    share * (aux_loss_coef * aux_loss + router_z_loss_coef * z_loss)

as the model's own forward weighs them. `share` is the micro-batch's share of the label tokens when the loss is
normalized by `num_items_in_batch` (SFT), else 1 (DPO: its loss is a mean per micro-batch, which `Trainer` divides by
the accumulation steps). A `router_aux_loss_coef` set in `SFTConfig` / `DPOConfig` replaces the model's
load-balancing coefficient, as in TRL. The two losses are logged as `aux_loss` and `z_loss`.

Not supported: encoder-decoder models (T5 MoE), refused with an error. TRL 1.x's SFT and DPO trainers train
decoder-only models only (the fused head scores the backbone's last hidden states against the shifted input ids);
fine-tune a T5 MoE with `MoeTrainer`.
"""

from __future__ import annotations

import copy

import torch

try:
    from trl import DPOTrainer, SFTTrainer
except ImportError as error:  # trl is an optional extra
    raise ImportError(
        'hf_moe\'s TRL trainers need trl: pip install "hf-moe[trl]" (or pip install "trl>=1.16,<2")'
    ) from error

from ..modeling.losses import accumulation_share, mean_over_layers
from .trainer import MoeTrainer

__all__ = ["MoeDPOTrainer", "MoeSFTTrainer"]

_IGNORE_INDEX = -100


class _BackboneRouterLosses:
    """While active, records the mean-over-layers router losses of the first forward of `backbone` (the policy's:
    SFT's compute_loss_func path and DPO's reference-adapter forward run the backbone again afterwards)."""

    def __init__(self, backbone: torch.nn.Module):
        self.backbone = backbone
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self._seen = False

    def _record(self, module, args, output) -> None:
        if not self._seen:
            self._seen = True
            self.aux_loss = mean_over_layers(output.router_balance_losses)
            self.z_loss = mean_over_layers(output.router_z_losses)

    def __enter__(self) -> _BackboneRouterLosses:
        self._handle = self.backbone.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


class _RouterLossesForTRL:
    """The part both trainers share: TRL's own MoE loss off, the hf_moe model's router losses added to TRL's loss."""

    # whether TRL's loss is a sum over label tokens divided by `num_items_in_batch` (SFT) or a per-micro-batch mean
    _loss_per_label_token: bool

    def __init__(self, model=None, *args, **kwargs):
        _check_model(model, type(self).__name__)
        # TRL sets config.output_router_logits for its own aux loss; restored below, so a saved config is unchanged
        output_router_logits = model.config.output_router_logits if hasattr(model, "config") else None
        super().__init__(model, *args, **kwargs)
        config = self._moe_model().config
        if output_router_logits is not None:
            config.output_router_logits = output_router_logits
        # TRL's compute_loss must neither ask for router logits nor add its aux loss: ours is added below
        self.aux_loss_enabled = False

    def _keep_router_losses_in_loss(self) -> None:
        # compute_loss adds them on every one of TRL's loss paths (fused head, label smoothing, compute_loss_func)
        pass

    def _moe_model(self):
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # explicit False: TRL's fused head would otherwise compute Mixtral's loss from the config's flag
        inputs = {
            **inputs,
            "output_router_logits": False,
            "output_router_balance_losses": True,
            "output_router_z_losses": True,
        }
        with _BackboneRouterLosses(self._moe_model().base_model) as router_losses:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
        loss = self._add_router_losses(loss, router_losses, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _add_router_losses(self, loss, router_losses, inputs, num_items_in_batch) -> torch.Tensor:
        config = self._moe_model().config
        if self._loss_per_label_token and num_items_in_batch is not None:
            # as the model's own loss and TRL's token loss: this micro-batch's share of the step's label tokens, times
            # the ranks when Trainer averages the tokens across devices (DDP then averages the gradients)
            share = accumulation_share(inputs["labels"][..., 1:].ne(_IGNORE_INDEX).sum(), num_items_in_batch)
            if self.args.average_tokens_across_devices:
                share = share * (self.accelerator.num_processes // self.get_tp_size())
        else:
            share = 1.0
        mode = "train" if self.model.training else "eval"
        for name, router_loss, coef in (
            ("aux_loss", router_losses.aux_loss, config.aux_loss_coef),
            ("z_loss", router_losses.z_loss, config.router_z_loss_coef),
        ):
            if router_loss is None:
                continue
            loss = loss + coef * share * router_loss.to(loss.device)
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(router_loss.detach()).mean().item())
        return loss


def _check_model(model, trainer_name: str) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "router_z_loss_coef"):
        raise TypeError(
            f"{trainer_name} trains hf_moe models (GPT2MoeForCausalLM, or a PEFT model of one), loaded or built before "
            f"the trainer; got {type(model).__name__}. For other models use TRL's trainer directly."
        )
    if config.is_encoder_decoder:
        raise ValueError(
            f"{trainer_name} cannot train {type(model).__name__}: TRL's SFT and DPO trainers train decoder-only models "
            "only (their fused LM head scores the shifted input ids). Fine-tune an encoder-decoder MoE with "
            "hf_moe.MoeTrainer."
        )


class MoeSFTTrainer(_RouterLossesForTRL, MoeTrainer, SFTTrainer):
    """`trl.SFTTrainer` for hf_moe decoder-only models: the loss is TRL's (any `loss_type`, completion-only or
    assistant-only masks, label smoothing, a `compute_loss_func`) plus the model's weighted router losses; on one
    batch with the default `loss_type="nll"` it equals the model's own `loss` with those labels. Takes `MoeTrainer`'s
    `moe_preset`, `expert_lr_scale`, `router_lr_scale` and `router_weight_decay` besides SFTTrainer's arguments."""

    _loss_per_label_token = True


class MoeDPOTrainer(_RouterLossesForTRL, MoeTrainer, DPOTrainer):
    """`trl.DPOTrainer` for hf_moe decoder-only models: TRL's preference loss plus the policy's weighted router losses
    (of its forward on the chosen and rejected sequences; the reference model's are not computed). The reference is a
    `ref_model` you pass; with a `peft_config` (or a PEFT policy), the policy with its adapter disabled; else a frozen
    copy of the policy as it is when the trainer is made. Takes `MoeTrainer`'s arguments besides DPOTrainer's."""

    _loss_per_label_token = False

    def __init__(self, model=None, ref_model=None, args=None, *more, **kwargs):
        uses_adapter = kwargs.get("peft_config") is not None or hasattr(model, "get_base_model")
        if ref_model is None and not uses_adapter and isinstance(model, torch.nn.Module):
            # TRL 1.x would load the reference from `config._name_or_path`: a model built or fine-tuned in memory (e.g.
            # right after SFT) has no such folder, or a folder holding other weights. The reference is the policy now.
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        super().__init__(model, ref_model, args, *more, **kwargs)
