"""Layout-independent expert initialization: expert e of layer L gets the same weights whatever `ep_size` is.

Colossal-AI's `moe_set_seed` gives each expert-parallel rank its own seed so that experts on different ranks start
different. Seeding per rank would tie the weights to the layout; here each experts module draws its full (E, ...)
weights from a generator seeded by (seed, module name) and every rank keeps its own rows, so one process and any
number of ranks start from identical experts. (Expert dropout's per-rank stream lives in `ExpertActivation`.)
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from ..modeling._compat import local_shard_offset
from ..modeling.moe_parts import moe_experts

__all__ = ["reset_experts_"]


@torch.no_grad()
def reset_experts_(model: nn.Module, seed: int) -> None:
    """Re-initialize every experts module of `model` with the family's init, reproducibly from `seed`.

    Works on a single-process model and on an expert-parallel one (each rank writes its own experts' rows).
    """
    for name, module in moe_experts(model):
        owner = _owning_pretrained_model(model, name)
        # a full-size twin of this module, built on one process and initialized by the family's `_init_weights`
        twin_config = _config_without_layout(owner.config)
        with torch.device("cpu"):
            twin = type(module)(twin_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            owner._init_weights(twin)
        for param_name, param in module.named_parameters(recurse=False):
            full = getattr(twin, param_name)
            _copy_my_rows(param, full)


def _copy_my_rows(param: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        param.copy_(full.to(param.dtype))
        return
    shape, offset = local_shard_offset(param, param.shape)
    rows = tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))
    param.to_local().copy_(full[rows].to(param.dtype))


def _owning_pretrained_model(model: nn.Module, module_name: str):
    # T5's stacks are sub-models with their own config copy; the innermost PreTrainedModel above the module owns it
    from transformers import PreTrainedModel

    owner = model
    parts = module_name.split(".")
    current = model
    for part in parts:
        current = getattr(current, part)
        if isinstance(current, PreTrainedModel):
            owner = current
    return owner


def _config_without_layout(config):
    import copy

    twin = copy.copy(config)
    twin.distributed_config = None
    return twin
