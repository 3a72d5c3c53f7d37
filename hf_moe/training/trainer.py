"""`MoeTrainer`: `Trainer` with what an MoE needs and a plain `Trainer` cannot do through public API.

- The loss keeps the router losses when the Trainer computes it itself (`label_smoothing_factor > 0` or a
  `compute_loss_func`): both go through `MoeLoss`.
- `LoadBalanceCallback`s are put first among the callbacks, so the reporting integrations log their metrics.
- Routers balanced once per optimizer step (expert bias, global-batch loss) get their `RouterBalancingCallback`.
- The optimizer uses the MoE presets and parameter groups (`optimizers.py`).
- Checkpoints of an expert-parallel model (sharded at load time) can resume (`sharded_checkpoint.py`).
"""

from __future__ import annotations

from typing import Literal

from transformers import Trainer

from .callbacks import LoadBalanceCallback
from .moe_loss import MoeLoss
from .optimizers import _check_preset, apply_moe_preset, create_moe_optimizer
from .router_balancing import RouterBalancingCallback, needs_router_balancing
from .sharded_checkpoint import ShardedCheckpointMixin

__all__ = ["MoeTrainer"]


class MoeTrainer(ShardedCheckpointMixin, Trainer):
    """`Trainer` plus MoE optimizer presets, router losses in every loss, load-balance callbacks first.

    The preset is applied in `__init__`, before Trainer wraps the model for distributed training, so frozen
    parameters are neither all-reduced nor handed to the optimizer. With `label_smoothing_factor > 0` the loss is the
    label-smoothed cross-entropy (labels shifted for GPT-2) plus the weighted router losses; a `compute_loss_func`
    you pass gets the weighted router losses added to its result (`MoeLoss(base_loss=...)`).
    """

    def __init__(
        self,
        *args,
        moe_preset: str = "all",
        expert_lr_scale: float | Literal["sqrt_num_experts"] = 1.0,
        router_lr_scale: float = 1.0,
        router_weight_decay: float | None = None,
        **kwargs,
    ):
        _check_preset(moe_preset)
        super().__init__(*args, **kwargs)
        self.moe_preset = moe_preset
        self.moe_optimizer_kwargs = dict(
            expert_lr_scale=expert_lr_scale, router_lr_scale=router_lr_scale, router_weight_decay=router_weight_decay
        )
        apply_moe_preset(self.model, moe_preset)
        self._keep_router_losses_in_loss()
        for callback in list(self.callback_handler.callbacks):
            if isinstance(callback, LoadBalanceCallback):
                callback.attach_to(self)
        balancing = any(isinstance(c, RouterBalancingCallback) for c in self.callback_handler.callbacks)
        if needs_router_balancing(self.model) and not balancing:
            super().add_callback(RouterBalancingCallback())

    def _keep_router_losses_in_loss(self) -> None:
        """When Trainer computes the loss itself, it calls the model without labels: `MoeLoss` adds the router losses
        back. (The TRL trainers, which compute every loss themselves, add them their own way.)"""
        if self.compute_loss_func is not None or self.label_smoother is not None:
            self.compute_loss_func = MoeLoss(
                self.model, label_smoothing=self.args.label_smoothing_factor, base_loss=self.compute_loss_func
            )
            self.label_smoother = None  # MoeLoss smooths the labels itself

    def add_callback(self, callback) -> None:
        if isinstance(callback, type) and issubclass(callback, LoadBalanceCallback):
            callback = callback()
        if isinstance(callback, LoadBalanceCallback):
            callback.attach_to(self)
        else:
            super().add_callback(callback)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = create_moe_optimizer(
                self.model if model is None else model, self.args, preset=self.moe_preset, **self.moe_optimizer_kwargs
            )
        return self.optimizer
