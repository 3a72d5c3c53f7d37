"""`MoePreTrainedMixin`: what every hf_moe family's `PreTrainedModel` adds to its transformers parent.

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from transformers import initialization as init
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils.output_capturing import OutputRecorder

from .routing import NoisyTopKRouter, Router, RouterOutput
from .sparse_moe import SparseMoeBlock, require_non_reentrant_checkpointing

__all__ = ["ROUTER_OUTPUT_RECORDERS", "MoePreTrainedMixin"]

# the router outputs a family's `_can_record_outputs` adds to its dense parent's: what `output_router_logits` returns
# and what the model's loss collects, captured by transformers' output recorders from every `Router`
ROUTER_OUTPUT_RECORDERS = {
    "router_logits": OutputRecorder(Router, index=RouterOutput._fields.index("logits_TE")),
    "router_balance_losses": OutputRecorder(Router, index=RouterOutput._fields.index("balance_loss")),
    "router_z_losses": OutputRecorder(Router, index=RouterOutput._fields.index("z_loss")),
}


class MoePreTrainedMixin:
    """Put first in the bases of a family's `PreTrainedModel`; set `_auto_map_heads` to the family's heads."""

    # Auto class name -> class name in the family's modeling file, written to `auto_map` on save so the folder
    # loads with any of these Auto classes under trust_remote_code
    _auto_map_heads: dict[str, str] = {}

    def save_pretrained(self, save_directory, *args, **kwargs):
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
        wrapper_class = type(self)
        wrapper_class._auto_class = None  # the wrapper class belongs to this instance alone
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del wrapper_class._auto_class
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
        return super().maybe_distribute_model(model, distributed_config, mesh_manager)

    def _init_weights(self, module):
        """The dense parent's init, plus the routers and the counters; each family adds its experts' init."""
        super()._init_weights(module)
        if isinstance(module, SparseMoeBlock):
            # the counters are non-persistent buffers: `from_pretrained` allocates them uninitialized (torch.empty)
            # and leaves their values to this method
            for name in module.COUNTERS:
                init.zeros_(getattr(module, name))
        elif isinstance(module, Router):
            init.normal_(module.weight, mean=0.0, std=self.config.router_init_std)
            if isinstance(module, NoisyTopKRouter):
                init.zeros_(module.noise_weight)  # Shazeer et al.: start from no learned noise preference

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # Registered for Auto classes, the families count as custom code, and transformers then skips every module
        # whose own (non-recursive) parameters are all initialized: vacuously true of modules with no parameters of
        # their own, like T5's attention, whose `_init_weights` branch sets q/k/v/o and the relative bias, so they kept
        # the generic Linear init (std 1.0). That shortcut protects code that writes weights without transformers'
        # `init` functions; ours only uses them, so the families initialize exactly as the dense models do.
        super()._initialize_weights(module, is_custom_code=False)

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers caches this answer (is `@use_experts_implementation` in the class's file?) as a class attribute
        # that subclasses inherit: once a dense parent class was asked (False: no experts there; every dense model's
        # init asks), each class of the family would read False and silently run eager. So each class answers itself.
        if "_can_set_experts_implementation_cached_value" not in cls.__dict__:
            cls._can_set_experts_implementation_cached_value = None
        return super()._can_set_experts_implementation()

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        if enable:
            require_non_reentrant_checkpointing(gradient_checkpointing_func)
        if gradient_checkpointing_func is None:
            return super()._set_gradient_checkpointing(enable=enable, **kwargs)
        return super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, **kwargs)
