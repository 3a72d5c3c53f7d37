"""`MoePreTrainedMixin`: what every hf_moe family's `PreTrainedModel` adds to its transformers parent.

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

from .sparse_moe import require_non_reentrant_checkpointing

__all__ = ["MoePreTrainedMixin"]


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
