"""Every access hf_moe makes to private transformers / torch API, in one place, each behind a version guard.

"Private" means what transformers or torch use internally and do not document for model authors: underscore methods
we override or call, underscore attributes we read or write, module-level tables we extend. (The class attributes and
hooks every transformers model file sets, like `_init_weights`, `_no_split_modules` or `_can_record_outputs`, are the
model-author contract and are used directly.) Each entry here has one named test in `tests/modeling/test_compat.py`
that fails, naming the entry, when the installed version no longer has what the entry relies on.

Also here: `restates`, the marker of family methods that restate a transformers method; the pinned-source tests
compare the installed parent's source with the hash recorded when it was restated.

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

__all__ = [
    "KeepsFloat32Buffers",
    "PrivateModelHooks",
    "auto_class_hidden",
    "DTENSOR_REDISTRIBUTE_LOGGER",
    "decay_parameter_names",
    "flatten_device_mesh",
    "from_config_without_init",
    "grouped_linear",
    "install_output_recorders",
    "local_shard_offset",
    "mesh_data_parallel_group",
    "parent_recorders",
    "quiet_unmergeable_full_gathers",
    "register_experts_function",
    "register_names_for_trainer_and_pipelines",
    "require_private",
    "require_trainer_checkpoint_hooks",
    "restates",
    "set_experts_implementation_of_copy",
    "set_fsdp_units",
    "update_parallel_plans",
]


def require_private(owner, name: str, parameters: tuple[str, ...] = ()) -> None:
    """Version guard: raise ImportError naming `owner.name` if it is missing or lost one of `parameters`."""
    target = getattr(owner, name, None)
    owner_name = getattr(owner, "__qualname__", getattr(owner, "__name__", repr(owner)))
    if target is None:
        raise ImportError(
            f"hf_moe relies on {owner_name}.{name}, which the installed version no longer has; "
            "install a transformers / torch version hf_moe supports (see pyproject.toml)"
        )
    if parameters:
        accepted = inspect.signature(target).parameters
        missing = [p for p in parameters if p not in accepted]
        if missing:
            raise ImportError(f"hf_moe relies on {owner_name}.{name} taking {missing}; the installed version does not")


def restates(parent: str, source_sha256: str):
    """Mark a family method that restates transformers' method `parent` (a dotted path from `transformers.`).

    `source_sha256` is the first 16 hex digits of the SHA-256 of `inspect.getsource(parent)` when it was restated.
    The pinned-source tests fail, naming the method, as soon as the installed parent's source differs.
    """

    def mark(function: Callable) -> Callable:
        function.__hf_moe_restates__ = (parent, source_sha256)
        return function

    return mark


# ---------------------------------------------------------------------------------------------------- torch


class KeepsFloat32Buffers:
    """Mixin for an `nn.Module` whose `float32_buffers` stay float32 through `.to(dtype)`, `.half()`, `.bfloat16()`.

    Counters are sums over many forwards: in bfloat16 a count stops growing at 256; an expert bias moves in steps of
    ~1e-3, which bfloat16 rounds. `Module._apply` is what every dtype/device cast goes through (torchmetrics overrides
    it for its states too). A cast that changed the dtype is replaced by the float32 original on the new device, so
    the values survive exactly, not just the dtype.
    """

    float32_buffers: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn, recurse=True):
        originals = {name: self._buffers.get(name) for name in self.float32_buffers}
        result = super()._apply(fn, recurse)
        for name, original in originals.items():
            buffer = self._buffers.get(name)
            if buffer is None or buffer.dtype == torch.float32:
                continue
            keeps_values = original is not None and original.dtype == torch.float32
            self._buffers[name] = original.to(buffer.device) if keeps_values else buffer.float()
        return result


require_private(nn.Module, "_apply", ("fn", "recurse"))


def local_shard_offset(param, full_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's shard of a DTensor `param`."""
    from torch.distributed.tensor import _utils

    require_private(_utils, "compute_local_shape_and_global_offset")
    return _utils.compute_local_shape_and_global_offset(full_shape, param.device_mesh, param.placements)


def flatten_device_mesh(mesh):
    """The 1D view over all dims of a device mesh (`DeviceMesh._flatten`, cached on the root mesh: a second call for
    the same dims returns the same mesh). Collective: every rank of the mesh calls it."""
    require_private(type(mesh), "_flatten")
    return mesh._flatten()


def mesh_data_parallel_group(model):
    """The process group of the ranks that hold distinct batches, from transformers' device mesh of `model`."""
    mesh = model._mesh_manager.get_mesh(("dp_replicate", "fsdp"))
    return flatten_device_mesh(mesh).get_group() if mesh.ndim > 1 else mesh.get_group()


# the logger of torch's private `torch.distributed.tensor._redistribute`, where DTensor logs its hints
DTENSOR_REDISTRIBUTE_LOGGER = "torch.distributed.tensor._redistribute"


class _UnmergeableFullGatherHint:
    """Drops DTensor's "cannot merge these all_gathers" hint for gathers to a fully replicated tensor (a save)."""

    def filter(self, record) -> bool:
        if not str(record.msg).startswith("While redistributing from") or not isinstance(record.args, tuple):
            return True
        if len(record.args) != 5:
            return True
        _, destination, _, comm_type, reason = record.args
        replicated = all(type(placement).__name__ == "Replicate" for placement in destination)
        return not (comm_type == "all_gather" and replicated and "non-ascending" in str(reason))


@contextlib.contextmanager
def quiet_unmergeable_full_gathers():
    """While open, DTensor's hint that a full gather of an expert weight runs as two all_gathers is not logged.

    A consolidated save gathers each expert weight (placements `(_StridedShard(dim=0), Shard(dim=0))` on the 2D expert
    mesh) inner dim first, which DTensor cannot merge into one collective even over a flattened mesh, and says so on
    every rank, for every weight, at every save. It costs one extra gather per expert weight per save; nothing to fix
    on our side. Every other DTensor message is still logged.
    """
    import logging

    require_private(torch.distributed.tensor, "_redistribute")
    logger = logging.getLogger(DTENSOR_REDISTRIBUTE_LOGGER)
    hint = _UnmergeableFullGatherHint()
    logger.addFilter(hint)
    try:
        yield
    finally:
        logger.removeFilter(hint)


# ---------------------------------------------------------------------------------------------------- transformers


class _PauseCounting:
    """`context_fn` for non-reentrant activation checkpointing: routing counters are off while a layer's forward is
    recomputed in backward (it was counted when it first ran). A class, not a closure, so `copy.deepcopy` of a model
    re-points it at the copy's blocks."""

    def __init__(self, blocks: list[nn.Module], inner: Callable | None = None):
        self.blocks = blocks
        self.inner = inner

    def __call__(self):
        forward_context, recompute_context = self.inner() if self.inner else (contextlib.nullcontext(),) * 2
        return forward_context, self._paused(recompute_context)

    @contextlib.contextmanager
    def _paused(self, recompute_context):
        with recompute_context:
            for block in self.blocks:
                block.counting = False
            try:
                yield
            finally:
                for block in self.blocks:
                    block.counting = True


class PrivateModelHooks:
    """Overrides of private `PreTrainedModel` methods; put before the transformers parent in a model's bases."""

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

    def _adjust_bias(self, output_embeddings, input_embeddings):
        # `tie_weights` calls this for every tied pair, to fit an output embedding's bias and size to the vocabulary
        # it is tied to. Only the output embeddings are such a pair: inside WideNet's shared blocks (`shared_blocks.py`)
        # it would cut a GPT-2 Conv1D's bias to the first dim of its (in, out) weight.
        if output_embeddings is self.get_output_embeddings():
            super()._adjust_bias(output_embeddings, input_embeddings)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        from transformers.modeling_layers import GradientCheckpointingLayer

        if gradient_checkpointing_func is None:
            super()._set_gradient_checkpointing(enable=enable, **kwargs)
        else:
            super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, **kwargs)
        if not enable:
            return
        # every checkpointed layer that holds MoE blocks gets its function with counting paused during recompute
        for layer in self.modules():
            if not isinstance(layer, GradientCheckpointingLayer):
                continue
            blocks = [m for m in layer.modules() if getattr(type(m), "moe_part", None) == "block"]
            function = getattr(layer, "_gradient_checkpointing_func", None)
            if not blocks or function is None:
                continue
            keywords = dict(getattr(function, "keywords", {}))
            inner = keywords.pop("context_fn", None)
            keywords.setdefault("use_reentrant", False)  # a context_fn needs it; MoE models refuse reentrant anyway
            layer._gradient_checkpointing_func = functools.partial(
                getattr(function, "func", function), **keywords, context_fn=_PauseCounting(blocks, inner)
            )


def _require_model_hooks() -> None:
    from transformers import PreTrainedModel

    require_private(PreTrainedModel, "_initialize_weights", ("module", "is_custom_code"))
    require_private(PreTrainedModel, "_can_set_experts_implementation")
    require_private(PreTrainedModel, "_adjust_bias", ("output_embeddings", "input_embeddings"))
    require_private(PreTrainedModel, "_set_gradient_checkpointing", ("enable", "gradient_checkpointing_func"))


_require_model_hooks()


@contextlib.contextmanager
def auto_class_hidden(model_class: type):
    """Inside: `model_class` is not registered for an Auto class (transformers then saves no remote code for it)."""
    model_class._auto_class = None
    try:
        yield
    finally:
        del model_class._auto_class


def install_output_recorders(model) -> None:
    """Install transformers' output-capturing hooks on `model` now. transformers installs them on the first forward
    that asks for a recorded output, under a threading lock that `torch.compile(fullgraph=True)` cannot trace; the
    router losses are asked for by every forward with labels, so a compiled training step would break there."""
    from transformers.utils import output_capturing

    require_private(output_capturing, "maybe_install_capturing_hooks")
    output_capturing.maybe_install_capturing_hooks(model)


def parent_recorders(parent: type) -> dict:
    """The outputs a transformers model class records (`_can_record_outputs`), to extend in a subclass."""
    return dict(parent._can_record_outputs or {})


def set_experts_implementation_of_copy(config, experts_implementation: str) -> None:
    """Set the experts implementation on a config copy that `set_experts_implementation` does not reach."""
    config._experts_implementation_internal = experts_implementation


def grouped_linear(
    x_ND: torch.Tensor, weight: torch.Tensor, offsets_E: torch.Tensor, bias_NO: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    """Rows of `x_ND` sorted by expert (expert e's rows end at `offsets_E[e]`) times their expert's weight, plus the
    per-row bias: transformers' `_grouped_linear`. It chooses between torch's grouped GEMM and transformers' own
    fallback op by device, dtype and compile state (`_can_use_grouped_mm`), which hf_moe should not restate."""
    from transformers.integrations import moe

    return moe._grouped_linear(x_ND, weight, offsets_E, bias=bias_NO, is_transposed=transposed)


def register_experts_function(name: str, forward: Callable) -> None:
    """Make `name` an experts implementation: transformers' `ALL_EXPERTS_FUNCTIONS` table, which the
    `@use_experts_implementation` forward and `set_experts_implementation`'s check both read."""
    from transformers.integrations import moe

    moe.ALL_EXPERTS_FUNCTIONS.register(name, forward)


def _require_experts_integration() -> None:
    from transformers.integrations import moe

    require_private(moe, "_grouped_linear", ("input", "weight", "offs", "bias", "is_transposed"))
    require_private(moe, "ALL_EXPERTS_FUNCTIONS")
    require_private(type(moe.ALL_EXPERTS_FUNCTIONS), "register", ("key", "value"))


_require_experts_integration()


def update_parallel_plans(model, keep: Callable[[str], bool]) -> None:
    """Drop the expert-parallel / FSDP plan rules of `model` for which `keep(rule)` is False."""
    model._ep_plan = {key: style for key, style in model._ep_plan.items() if keep(key)}
    model._fsdp_plan = {key: style for key, style in model._fsdp_plan.items() if keep(key)}


def set_fsdp_units(model, units: dict[str, str]) -> None:
    """Replace the FSDP2 plan of `model` (module name pattern -> "free_full_weight" / "keep_full_weight")."""
    model._fsdp_plan = dict(units)


def from_config_without_init(model_class: type, config, dtype: torch.dtype):
    """`model_class` built from `config` with no random init (every weight is written afterwards)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return model_class._from_config(config, dtype=dtype)


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Trainer's weight-decay rule (no decay for biases and norms); the method does not use its Trainer instance."""
    from transformers import Trainer

    return list(Trainer.get_decay_parameter_names(None, model))


def require_trainer_checkpoint_hooks() -> None:
    """The private `Trainer` methods `ShardedCheckpointMixin` overrides, with the arguments it relies on."""
    from transformers import Trainer

    require_private(Trainer, "_save_optimizer_and_scheduler", ("output_dir",))
    require_private(Trainer, "_load_from_checkpoint", ("resume_from_checkpoint", "model"))
    require_private(Trainer, "_load_best_model")
    require_private(Trainer, "_load_optimizer_and_scheduler", ("checkpoint",))


# The mappings Trainer and pipelines consult by class *name* (not by the Auto registry): Trainer shifts labels for
# label smoothing only for names in the causal-LM mapping and refuses to train names in the base-model mapping; the
# text-generation pipeline logs "not supported" for names outside it.
_NAME_MAPPINGS = (
    "MODEL_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES",
)


def register_names_for_trainer_and_pipelines(model_type: str, class_names: dict[str, str]) -> None:
    """Add `model_type -> class name` to transformers' name mappings (`{"MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": ...}`)."""
    from transformers.models.auto import modeling_auto

    for mapping_name, class_name in class_names.items():
        if mapping_name not in _NAME_MAPPINGS:
            raise ValueError(f"unknown name mapping {mapping_name!r}; one of {_NAME_MAPPINGS}")
        require_private(modeling_auto, mapping_name)
        getattr(modeling_auto, mapping_name)[model_type] = class_name
