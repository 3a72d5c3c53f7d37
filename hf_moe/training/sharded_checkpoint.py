"""Resumable Trainer checkpoints for models sharded at load time (`from_pretrained(distributed_config=...)`).

Transformers 5.24's `Trainer` refuses to checkpoint the optimizer of such a model (it raises unless
`save_only_model=True`), so expert-parallel training could not resume. `ShardedCheckpointMixin` fills that gap with
PyTorch Distributed Checkpoint (DCP): every rank writes its own shards of the model and the optimizer state (DTensors,
expert rows included) into `<checkpoint>/sharded_state/`, and reads them back on resume. The Trainer still writes the
consolidated, Hub-portable model beside it, the scheduler, the per-rank RNG states and `trainer_state.json` as usual.

DCP stores tensors by parameter name and global offset, so a run may resume on another layout (another `ep_size` or
number of processes) as long as the model and optimizer are the same.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import TrainingArguments
from transformers.trainer import SCHEDULER_NAME

from ..modeling._compat import require_trainer_checkpoint_hooks

__all__ = [
    "SHARDED_STATE_DIR",
    "ShardedCheckpointMixin",
    "load_sharded_model",
    "load_sharded_optimizer",
    "save_sharded",
]

SHARDED_STATE_DIR = "sharded_state"

# the mixin overrides private Trainer methods: fail at import, naming the method, if they changed
require_trainer_checkpoint_hooks()


def _is_sharded_at_load(model: nn.Module | None) -> bool:
    return bool(getattr(model, "is_distributed_loading_by_transformers", False))


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    # Accelerate wraps the optimizer; DCP maps parameters to names through the real one
    return getattr(optimizer, "optimizer", optimizer)


def _state_folder(checkpoint: str) -> str:
    folder = os.path.join(checkpoint, SHARDED_STATE_DIR)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{checkpoint} has no {SHARDED_STATE_DIR}/ folder, so it cannot resume a model sharded at load time: it "
            "was not written by hf_moe's MoeTrainer, or was written with save_only_model=True (the model alone). "
            "Load its consolidated weights with from_pretrained to start a new run from it instead."
        )
    return folder


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: str) -> None:
    """Collective: every rank writes its shards of the model and optimizer state to `<checkpoint>/sharded_state/`."""
    state = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, _torch_optimizer(optimizer)),
    }
    dcp.save(state, checkpoint_id=os.path.join(checkpoint, SHARDED_STATE_DIR))


def load_sharded_model(model: nn.Module, checkpoint: str) -> None:
    """Collective: load this rank's shards of the model written by `save_sharded` (any layout) into `model`."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=_state_folder(checkpoint))
    set_model_state_dict(model, state["model"])


def load_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: str) -> None:
    """Collective: load the optimizer state written by `save_sharded` into `optimizer` (built over `model`)."""
    optimizer = _torch_optimizer(optimizer)
    # a fresh optimizer has no state yet: DCP builds its entries (a zero-lr step) so there is something to load into
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=_state_folder(checkpoint))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


class ShardedCheckpointMixin:
    """Put before `Trainer` in the bases: full, resumable checkpoints for a model sharded at load time.

    Without `save_only_model=True` transformers' Trainer refuses such a model; this mixin lets it through and saves
    what the Trainer would skip (the sharded optimizer state, with the model's shards for an exact resume). With
    `save_only_model=True`, or for an ordinary model, the Trainer behaves exactly as usual.
    """

    def __init__(self, *args, **kwargs):
        # the model comes first in every Trainer subclass; the training arguments do not (TRL's DPOTrainer takes the
        # reference model second), so they are found by type
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args") or next((a for a in args if isinstance(a, TrainingArguments)), None)
        full_checkpoints = (
            _is_sharded_at_load(model) and training_args is not None and not training_args.save_only_model
        )
        if full_checkpoints:
            # passes the Trainer's refusal (it checks `save_only_model` in __init__), then restores the user's choice
            # so that `_save_checkpoint` calls the optimizer, scaler and RNG saves overridden or kept below
            training_args.save_only_model = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            if full_checkpoints:
                training_args.save_only_model = False

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not _is_sharded_at_load(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        save_sharded(self.model, self.optimizer, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not _is_sharded_at_load(self.model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_sharded_model(self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        # `load_best_model_at_end=True`: the Trainer would load the consolidated weights into plain tensors
        if not _is_sharded_at_load(self.model):
            return super()._load_best_model()
        load_sharded_model(self.model, self.state.best_model_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not _is_sharded_at_load(self.model):
            return super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        load_sharded_optimizer(self.model, self.optimizer, checkpoint)
        with warnings.catch_warnings():
            # the scheduler's own "please also save the optimizer" warning does not apply: it is saved above
            warnings.simplefilter("ignore", UserWarning)
            scheduler_state = torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        self.lr_scheduler.load_state_dict(scheduler_state)
