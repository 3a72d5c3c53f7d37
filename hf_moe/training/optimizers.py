"""MoE optimizer presets: parameter groups for experts, routers and the rest, expert learning-rate scaling, freezing.

- Expert LR scaling: each expert sees about 1/E of the tokens, so its gradient is noisier and its updates rarer;
  Artetxe et al. 2021 scale the experts' learning rate up, here with `expert_lr_scale` (a number, or
  "sqrt_num_experts" for x sqrt(E) per MoE layer).
- Presets (which parameters train):
    "all"                     everything (parameter groups only)
    "freeze_experts"          experts frozen; routers and the dense parameters train
    "train_non_experts_only"  experts and routers frozen (ST-MoE, Zoph et al. 2022: fine-tuning only the non-MoE
                              parameters works about as well as fine-tuning all, and it overfits less)
    "train_routers_only"      only the routers train
  A preset only freezes (requires_grad=False); it never unfreezes what the user froze.

With a plain `Trainer`: `Trainer(..., optimizers=(create_moe_optimizer(model, args, preset=...), None))`, or use
`MoeTrainer(..., moe_preset=..., expert_lr_scale=...)` (`trainer.py`), which builds the same optimizer in
`create_optimizer`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from ..modeling._compat import decay_parameter_names
from ..modeling.moe_parts import moe_experts, moe_part_kind

__all__ = [
    "MOE_OPTIMIZER_PRESETS",
    "apply_moe_preset",
    "classify_moe_parameters",
    "create_moe_optimizer",
    "moe_param_groups",
]

MOE_OPTIMIZER_PRESETS = ("all", "freeze_experts", "train_non_experts_only", "train_routers_only")
_TRAINED_KINDS = {
    "all": {"experts", "routers", "other"},
    "freeze_experts": {"routers", "other"},
    "train_non_experts_only": {"other"},
    "train_routers_only": {"routers"},
}


_PARAMETER_KINDS = {"experts": "experts", "router": "routers"}


def classify_moe_parameters(model: nn.Module) -> dict[str, str]:
    """Every parameter name of `model` -> "experts" (in MoE experts), "routers" (in a router) or "other"."""
    kinds: dict[str, str] = {}
    for module_name, module in model.named_modules():
        kind = _PARAMETER_KINDS.get(moe_part_kind(module))
        if kind is None:
            continue
        for param_name, _ in module.named_parameters():
            kinds[f"{module_name}.{param_name}" if module_name else param_name] = kind
    return {name: kinds.get(name, "other") for name, _ in model.named_parameters()}


def _check_preset(preset: str) -> None:
    if preset not in MOE_OPTIMIZER_PRESETS:
        raise ValueError(f"preset must be one of {MOE_OPTIMIZER_PRESETS}, got {preset!r}")


def apply_moe_preset(model: nn.Module, preset: str) -> list[str]:
    """Freeze what `preset` does not train (requires_grad=False); returns the names of the parameters it froze."""
    _check_preset(preset)
    trained = _TRAINED_KINDS[preset]
    kinds = classify_moe_parameters(model)
    frozen = []
    for name, param in model.named_parameters():
        if kinds[name] not in trained and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    if not any(param.requires_grad for param in model.parameters()):
        raise ValueError(f"preset {preset!r} left no trainable parameter in the model")
    return frozen


def _expert_scales(model: nn.Module, expert_lr_scale: float | str) -> dict[str, float]:
    """Experts parameter name -> learning-rate multiplier."""
    if isinstance(expert_lr_scale, str) and expert_lr_scale != "sqrt_num_experts":
        raise ValueError(f"expert_lr_scale must be a number > 0 or 'sqrt_num_experts', got {expert_lr_scale!r}")
    if not isinstance(expert_lr_scale, str) and not expert_lr_scale > 0:
        raise ValueError(f"expert_lr_scale must be > 0, got {expert_lr_scale}")
    scales = {}
    for module_name, module in moe_experts(model):
        scale = math.sqrt(module.num_experts) if expert_lr_scale == "sqrt_num_experts" else float(expert_lr_scale)
        for param_name, _ in module.named_parameters():
            scales[f"{module_name}.{param_name}" if module_name else param_name] = scale
    return scales


def moe_param_groups(
    model: nn.Module,
    *,
    learning_rate: float,
    weight_decay: float = 0.0,
    expert_lr_scale: float | Literal["sqrt_num_experts"] = 1.0,
    router_lr_scale: float = 1.0,
    router_weight_decay: float | None = None,
) -> list[dict]:
    """Optimizer parameter groups over the trainable parameters: experts / routers / other, each split by weight decay.

    Each group carries `name` ("experts", "experts_no_decay", "routers", "other", "other_no_decay", ...; experts of
    layers with different E under "sqrt_num_experts" get one group per scale), `lr` and `weight_decay`. LR schedulers
    scale every group's `lr` by the same factor, so the ratios hold through warmup and decay.
    """
    if not router_lr_scale > 0:
        raise ValueError(f"router_lr_scale must be > 0, got {router_lr_scale}")
    kinds = classify_moe_parameters(model)
    expert_scales = _expert_scales(model, expert_lr_scale)
    # Trainer's own rule (no decay for biases and norms), so the groups match what Trainer would have built
    decay_names = set(decay_parameter_names(model))
    router_decay = weight_decay if router_weight_decay is None else router_weight_decay
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = kinds[name]
        decays = name in decay_names
        scale = expert_scales.get(name, 1.0) if kind == "experts" else router_lr_scale if kind == "routers" else 1.0
        group_decay = (router_decay if kind == "routers" else weight_decay) if decays else 0.0
        key = (kind, decays, scale)
        if key not in groups:
            group_name = kind if decays else f"{kind}_no_decay"
            groups[key] = {"name": group_name, "params": [], "lr": learning_rate * scale, "weight_decay": group_decay}
        groups[key]["params"].append(param)
    return list(groups.values())


def create_moe_optimizer(
    model: nn.Module,
    args: TrainingArguments,
    *,
    preset: str = "all",
    expert_lr_scale: float | Literal["sqrt_num_experts"] = 1.0,
    router_lr_scale: float = 1.0,
    router_weight_decay: float | None = None,
) -> torch.optim.Optimizer:
    """The optimizer `args.optim` names (as Trainer would build it), over `moe_param_groups`, after `preset`.

    Pass it to `Trainer(..., optimizers=(optimizer, None))`; Trainer still builds the LR scheduler.
    """
    apply_moe_preset(model, preset)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if any(key in optimizer_kwargs for key in ("params", "model", "optimizer_dict")):
        raise ValueError(f"optim={args.optim!r} builds its own parameter groups; MoE presets cannot be applied to it")
    groups = moe_param_groups(
        model,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        expert_lr_scale=expert_lr_scale,
        router_lr_scale=router_lr_scale,
        router_weight_decay=router_weight_decay,
    )
    optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "lr"}  # each group has its own lr
    return optimizer_cls(groups, lr=args.learning_rate, **optimizer_kwargs)
