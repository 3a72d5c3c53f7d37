"""`MoePreTrainedMixin`: what every hf_moe family's `PreTrainedModel` adds to its transformers parent.

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import initialization as init
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging
from transformers.utils.output_capturing import OutputRecorder

from ._compat import (
    PrivateModelHooks,
    auto_class_hidden,
    flatten_device_mesh,
    install_output_recorders,
    quiet_unmergeable_full_gathers,
    set_fsdp_units,
)
from .experts_auto import AUTO_EXPERTS_IMPLEMENTATION
from .moe_parts import moe_part_kind, moe_parts
from .routing import Router, RouterDecision
from .shared_blocks import share_experts_modules, shared_block_ties, tied_weights_patterns
from .sparse_moe import RouterLosses, RouterLossValues, require_non_reentrant_checkpointing

__all__ = ["ROUTER_OUTPUT_RECORDERS", "MoePreTrainedMixin", "ask_for_router_losses", "warn_if_router_losses_unused"]

logger = logging.get_logger(__name__)

# the outputs a family's `_can_record_outputs` adds to its dense parent's, captured by transformers' output recorders:
# every router's logits (what `output_router_logits` returns) and every layer's router losses (what the loss adds)
ROUTER_OUTPUT_RECORDERS = {
    "router_logits": OutputRecorder(Router, index=RouterDecision._fields.index("logits_TE")),
    "router_balance_losses": OutputRecorder(RouterLosses, index=RouterLossValues._fields.index("balance_loss")),
    "router_z_losses": OutputRecorder(RouterLosses, index=RouterLossValues._fields.index("z_loss")),
}


class MoePreTrainedMixin(PrivateModelHooks):
    """Put first in the bases of a family's `PreTrainedModel`; set `_auto_map_heads` to the family's heads."""

    # Auto class name -> class name in the family's modeling file, written to `auto_map` on save so the folder
    # loads with any of these Auto classes under trust_remote_code
    _auto_map_heads: dict[str, str] = {}
    # True on the classes whose parent's forward records outputs (`@capture_outputs`: GPT-2's model, T5's stacks):
    # their recorders are installed at init, so a compiled forward never has to install them
    _records_outputs: bool = False
    # the aux-loss-free balancing bias loads as float32 under any `dtype=`: its steps of ~1e-3 vanish in bfloat16 (the
    # router keeps it float32 through `.to(dtype)` too, `_compat.KeepsFloat32Buffers`)
    _keep_in_fp32_modules_strict = ["router.expert_bias"]
    # the attribute holding this class's own blocks (GPT-2's model: "h"; T5's stacks: "block"), which
    # `share_blocks_across_layers` ties (`shared_blocks.py`); None for classes that hold them through a sub-model
    _block_stack: str | None = None
    # the family's LayerNorm classes: every layer keeps its own under block sharing
    _per_layer_norms: tuple[type, ...] = ()
    # the name of the stack's final LayerNorm (FSDP2's one unit besides the root under block sharing)
    _final_norm: str | None = None

    def post_init(self):
        if self._block_stack is not None:
            blocks = getattr(self, self._block_stack)
            share_experts_modules(blocks, self.config)
            self._shared_block_ties = shared_block_ties(self._block_stack, blocks, self.config, self._per_layer_norms)
            if self._shared_block_ties:
                # save_pretrained leaves out of the file the copies these patterns name
                self._tied_weights_keys = {
                    **(type(self)._tied_weights_keys or {}),
                    **tied_weights_patterns(self._shared_block_ties),
                }
        super().post_init()
        if self._records_outputs:
            install_output_recorders(self)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # the families' default is hf_moe's own implementation (`experts_auto.py`), not transformers' "grouped_mm";
        # a requested one is checked by transformers, which knows ours through its experts interface
        if requested_experts is None:
            return AUTO_EXPERTS_IMPLEMENTATION
        return super().get_correct_experts_implementation(requested_experts)

    def init_parallel_plans(self) -> None:
        super().init_parallel_plans()
        if self._block_stack is not None and self.config.share_blocks_across_layers:
            # FSDP2 keeps a parameter tied only inside one unit, and a shared block's weights are in every block: the
            # blocks stay in the root unit (as the embedding tied to the LM head does), not a unit each. transformers
            # wants one unit besides the root: the final LayerNorm, which no layer shares.
            set_fsdp_units(self, {self._final_norm: "free_full_weight"})

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        ties = super().get_expanded_tied_weights_keys(all_submodels=all_submodels)
        if not all_submodels:
            # transformers expands `_tied_weights_keys` only under tie_word_embeddings=True; shared blocks stay tied
            # either way (with all_submodels, the parent calls this on every sub-model)
            ties.update(getattr(self, "_shared_block_ties", {}))
        return ties

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) on request
        _align_expert_weights(model)
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        if not _has_dtensor_parameters(self):
            return self._save_family(save_directory, *args, **kwargs)
        with quiet_unmergeable_full_gathers():  # expert parallelism: see the context manager's docstring
            return self._save_family(save_directory, *args, **kwargs)

    def gather_sharded_state_dict_for_save(self, model_to_save, state_dict, distributed_config, **kwargs) -> dict:
        gathered = super().gather_sharded_state_dict_for_save(model_to_save, state_dict, distributed_config, **kwargs)
        # transformers gathers every DTensor into a tensor of its own, so tied names no longer share storage and each
        # would be written (the LM head beside the embedding, every layer of a shared block): leave the tied copies
        # out, as a single-process save does; from_pretrained ties them again
        ties = model_to_save.all_tied_weights_keys.items()
        copies = {target for target, source in ties if _tied(model_to_save, target, source)}
        return {name: tensor for name, tensor in gathered.items() if name not in copies}

    def _save_family(self, save_directory, *args, **kwargs):
        family_class = self._family_class()
        module = family_class.__module__.rsplit(".", 1)[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.update({auto: f"{module}.{name}" for auto, name in self._auto_map_heads.items()})
        self.config.auto_map = auto_map
        if family_class is type(self):
            return super().save_pretrained(save_directory, *args, **kwargs)
        # FSDP2 (expert parallelism) swaps the instance's class for an `FSDP<Name>` subclass defined in torch, so
        # transformers would write `_fsdp_init.FSDP<Name>` into auto_map and copy torch's files instead of ours: save
        # with the wrapper marked as not remote code, then copy the family's modeling files ourselves.
        with auto_class_hidden(type(self)):  # the wrapper class belongs to this instance alone
            result = super().save_pretrained(save_directory, *args, **kwargs)
        if family_class.is_remote_code() and self.should_save_on_this_rank(kwargs.get("is_main_process", True)):
            source_file = sys.modules[family_class.__module__].__file__
            for needed_file in [source_file, *get_relative_import_files(source_file)]:
                shutil.copyfile(needed_file, Path(save_directory) / Path(needed_file).name)
        return result

    @classmethod
    def _family_class(cls) -> type:
        """The hf_moe class this model is an instance of, seen through wrappers that subclass it (FSDP2's)."""
        return next(klass for klass in cls.__mro__ if not klass.__module__.startswith("torch."))

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        # FSDP2 (`DistributedConfig(fsdp_size>1)`) keeps a parameter shared by several modules tied only if it is
        # shared when `fully_shard` runs; transformers ties the embeddings after sharding, so FSDP2 would keep one
        # copy per module and the optimizer would update only one of them (the others go stale after one step).
        # Tie them first (on the meta device this only sets attributes).
        if mesh_manager is not None:
            model.tie_weights()
        model = super().maybe_distribute_model(model, distributed_config, mesh_manager)
        _flatten_parameter_meshes(model)
        return model

    def _init_weights(self, module):
        """The dense parent's init, plus the routers and the counters; each family adds its experts' init."""
        super()._init_weights(module)
        kind = moe_part_kind(module)
        if kind == "block":
            # the counters are non-persistent buffers: `from_pretrained` allocates them uninitialized (torch.empty)
            # and leaves their values to this method
            for name in module.COUNTERS:
                init.zeros_(getattr(module, name))
            for name in module.losses.float32_buffers:  # the global batch's loads, when that scope is on
                if getattr(module.losses, name, None) is not None:
                    init.zeros_(getattr(module.losses, name))
            if getattr(module, "residual_coefficient", None) is not None:
                # Residual-MoE's mixing starts even, (1/2, 1/2), for every token
                init.zeros_(module.residual_coefficient.weight)
                init.zeros_(module.residual_coefficient.bias)
        elif kind == "router":
            module.init_weights(self.config.router_init_std)

    def resize_token_embeddings(self, *args, **kwargs):
        """transformers' resize, then every router with a token-id table (hash layers) widened to the new vocabulary
        without changing any routing, so that the model saves and loads with a table that fits its config."""
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        for _, router in moe_parts(self, "router"):
            if hasattr(router, "resize_table"):
                router.resize_table(self.config.vocab_size)
        return embeddings

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        if enable:
            require_non_reentrant_checkpointing(gradient_checkpointing_func)
        return super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, **kwargs)


def _tied(model, target: str, source: str) -> bool:
    return model.get_parameter_or_buffer(target) is model.get_parameter_or_buffer(source)


def _has_dtensor_parameters(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(param, DTensor) for param in model.parameters())


def _flatten_parameter_meshes(model) -> None:
    # transformers puts every expert weight on the 2D expert mesh (efsdp, ep) but registers no flattened view of it.
    # DTensor then reduces an expert gradient's norm (Trainer's gradient clipping, every step) as two sequential
    # all_reduces, and warns on every rank. Registering the flattened view makes it one (one latency, one reduction
    # order on every rank). Collective: maybe_distribute_model runs on every rank, parameters in the same order.
    from torch.distributed.tensor import DTensor

    meshes = {}
    for param in model.parameters():
        mesh = param.device_mesh if isinstance(param, DTensor) else None
        if mesh is not None and mesh.ndim > 1 and mesh.mesh_dim_names is not None:
            meshes.setdefault(tuple(mesh.mesh_dim_names), mesh)
    for mesh in meshes.values():
        flatten_device_mesh(mesh)


# the CPU allocator's alignment; freshly built models' weights have it
_CPU_ALIGNMENT_BYTES = 64


def _align_expert_weights(model) -> None:
    # Weights loaded from safetensors may stay in the memory-mapped file, at whatever offset the file gave them. The
    # grouped matmul kernels vectorize differently on unaligned memory, so a loaded model's logits could differ from
    # the saved model's in the last bits (seen: 1e-6 on T5 v1.0 experts). Copying misaligned expert weights into
    # aligned memory makes the save / load round trip bit-exact. Plain CPU tensors only (DTensor shards are owned).
    for _, experts in moe_parts(model, "experts"):
        for param in experts.parameters(recurse=False):
            plain_cpu = type(param.data) is torch.Tensor and param.device.type == "cpu"
            if plain_cpu and param.data_ptr() % _CPU_ALIGNMENT_BYTES:
                param.data = param.data.clone()


def ask_for_router_losses(model, labels, output_router_logits: bool, kwargs: dict) -> None:
    """Have the sub-models record the router losses (into `kwargs`) when this forward returns them: with labels (the
    loss adds them) or with `output_router_logits` (returned as `aux_loss` / `z_loss`, as Mixtral does)."""
    wanted = labels is not None or bool(output_router_logits)
    kwargs.setdefault("output_router_balance_losses", wanted)
    kwargs.setdefault("output_router_z_losses", wanted)
    if not wanted:
        warn_if_router_losses_unused(model)


def warn_if_router_losses_unused(model) -> None:
    """Warn once per model when it trains without labels and without returning its router losses: then no loss can
    hold them (e.g. `Trainer(label_smoothing_factor>0)` pops the labels and computes the loss from the logits)."""
    config = model.config
    if not (model.training and torch.is_grad_enabled()) or getattr(model, "_warned_router_losses_unused", False):
        return
    if config.aux_loss_coef == 0 and config.router_z_loss_coef == 0:
        return
    model._warned_router_losses_unused = True
    if not any(getattr(router, "learned", True) for _, router in moe_parts(model, "router")):
        return  # routers with nothing to learn (hash) have no losses to lose
    logger.warning(
        f"{type(model).__name__} is training without labels and without output_router_logits, so its router losses "
        f"(router_aux_loss_coef={config.aux_loss_coef}, router_z_loss_coef={config.router_z_loss_coef}) are in "
        "no loss. With Trainer(label_smoothing_factor>0) or your own loss, use hf_moe.MoeTrainer, or "
        "compute_loss_func=hf_moe.MoeLoss(model, ...), which add them."
    )
