"""What moefy knows about a dense family, declared as data: one frozen `FamilyMapping` per family (`gpt2.py`, `t5.py`).

A mapping states the dense model types it accepts, which source class becomes which MoE class, how the MoE config is
built, where each layer's dense FFN weights are (state-dict name templates) and which experts tensor each becomes,
where the MoE block of each layer is, and which layers each stack has. moefy reads only this and the `moe_part`
markers (`hf_moe.modeling.moe_parts`); it knows no module path of its own.

Names are relative to the *base model* (`model.base_model`: GPT-2's `transformer`, T5's model itself), so one mapping
serves every head of a family. Templates use `{layer}` and the placeholders of the stack (T5: `{stack}`, `{sublayer}`):

```
FFNTensor.dense  "h.{layer}.mlp.c_fc.weight"   (D, F) ──init method──► (E, D, F) ──► experts.up_proj of
FamilyMapping.block  "h.{layer}.mlp"                                                 the block at that name
```

Shape legend: D hidden size, F dense intermediate size, E experts.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..modeling.configuration_moe import moe_field_names
from ..modeling.moe_parts import moe_part_kind
from .init_methods import DenseFFN
from .layer_selection import select_layers

__all__ = [
    "SHARED_LAYER_FIELD",
    "FFNKind",
    "FFNTensor",
    "FamilyMapping",
    "LayerPlan",
    "Stack",
    "dense_config_fields",
    "router_and_expert_weight_names",
]

# moefy's layer argument that every stack without an argument of its own defaults to (T5: both stacks)
SHARED_LAYER_FIELD = "moe_layers"


@dataclass(frozen=True)
class FFNTensor:
    """One dense FFN tensor and the experts tensor it becomes."""

    # dense state-dict name template, relative to the base model
    dense: str
    # the experts' parameter it becomes, with a leading expert dim (several `part`s stack into one parameter)
    expert: str
    # the axis indexing intermediate neurons, in the experts' layout without the expert dim; None for a tensor with
    # no such axis (an output bias)
    neuron_axis: int | None
    # position among the tensors concatenated along their neuron axis into one parameter (T5 gated: [wi_0; wi_1])
    part: int | None = None
    # added once per selected expert outside any neuron: "split" divides it by E so the experts sum to the dense FFN
    output_bias: bool = False
    # the dense layout is the transpose of the experts' (2D only); neither built-in family needs it
    transpose: bool = False

    @property
    def key(self) -> str:
        """The tensor's name inside `DenseFFN` (unique within its FFN kind)."""
        return self.expert if self.part is None else f"{self.expert}[{self.part}]"


@dataclass(frozen=True)
class FFNKind:
    """One dense FFN variant of a family. The kind of a layer is the one whose tensors all exist in the dense model."""

    name: str
    # in this order into the init method: its random draws follow it, so reordering changes seeded results
    tensors: tuple[FFNTensor, ...]

    def dense_ffn(self, dense_state: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> DenseFFN:
        """The layer's FFN in float32 on the CPU (init methods are seeded there, device-independent)."""
        tensors = {}
        for tensor in self.tensors:
            value = dense_state[names[tensor.key]].detach().to("cpu", torch.float32)
            tensors[tensor.key] = value.t() if tensor.transpose else value
        return DenseFFN(
            tensors=tensors,
            neuron_axes={tensor.key: tensor.neuron_axis for tensor in self.tensors},
            output_biases=tuple(tensor.key for tensor in self.tensors if tensor.output_bias),
        )

    def expert_parameters(self, experts_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The init method's tensors (by `FFNTensor.key`, leading E) as the experts' parameters."""
        grouped: dict[str, list[FFNTensor]] = {}
        for tensor in self.tensors:
            grouped.setdefault(tensor.expert, []).append(tensor)
        parameters = {}
        for name, parts in grouped.items():
            if len(parts) == 1 and parts[0].part is None:
                parameters[name] = experts_tensors[parts[0].key]
                continue
            parts = sorted(parts, key=lambda tensor: tensor.part)
            # +1: the leading expert dim; T5 gated: [(E, F, D), (E, F, D)] -> (E, 2F, D)
            axis = parts[0].neuron_axis + 1
            parameters[name] = torch.cat([experts_tensors[part.key] for part in parts], dim=axis)
        return parameters


@dataclass(frozen=True)
class Stack:
    """A sequence of layers of the dense model (GPT-2: one; T5: encoder and decoder)."""

    # the stack's key in the conversion report (a family with one stack reports a plain list of layers)
    name: str
    # dense config field holding the stack's number of layers
    num_layers: str
    # moefy's argument and the MoE config field listing the stack's MoE layers
    layer_field: str
    # values of the stack's own template placeholders
    placeholders: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class LayerPlan:
    """One layer that becomes MoE: its MoE block and the dense FFN tensors it is made from."""

    # the block's qualified name in the MoE model (e.g. "transformer.h.3.mlp")
    label: str
    block: nn.Module
    kind: FFNKind
    # FFNTensor.key -> qualified dense state-dict name
    dense_names: Mapping[str, str]


@dataclass(frozen=True)
class FamilyMapping:
    """Everything moefy needs to know about one dense family, as data."""

    name: str
    # dense `config.model_type`s this family converts
    model_types: tuple[str, ...]
    # source class name -> the MoE class it becomes
    target_classes: Mapping[str, type[PreTrainedModel]]
    # the source class of a checkpoint whose config names no architecture
    default_source_class: str
    # (dense config, MoE fields incl. each stack's layer list) -> the MoE config
    build_config: Callable[[PretrainedConfig, dict], PretrainedConfig]
    # name template of each layer's MoE block in the MoE model, relative to its base model
    block: str
    stacks: tuple[Stack, ...]
    ffn_kinds: tuple[FFNKind, ...]

    def __post_init__(self):
        # a mistake in a declaration should fail at import, naming the family, not midway through a conversion
        if self.default_source_class not in self.target_classes:
            raise ValueError(
                f"{self.name}: default_source_class {self.default_source_class!r} is no target_classes key"
            )
        for kind in self.ffn_kinds:
            keys = [tensor.key for tensor in kind.tensors]
            if len(set(keys)) != len(keys):
                raise ValueError(f"{self.name}: FFN kind {kind.name!r} names a tensor twice: {keys}")
        for stack in self.stacks:
            known = {"layer", *stack.placeholders}
            templates = [self.block, *(tensor.dense for kind in self.ffn_kinds for tensor in kind.tensors)]
            for template in templates:
                unknown = _template_fields(template) - known
                if unknown:
                    raise ValueError(
                        f"{self.name}: {template!r} uses {sorted(unknown)}, unknown to stack {stack.name}"
                    )

    @property
    def layer_fields(self) -> tuple[str, ...]:
        return tuple(stack.layer_field for stack in self.stacks)

    @property
    def layer_arguments(self) -> tuple[str, ...]:
        """moefy's layer arguments this family takes."""
        return tuple(dict.fromkeys((SHARED_LAYER_FIELD, *self.layer_fields)))

    @property
    def moe_config_fields(self) -> tuple[str, ...]:
        """The MoE fields of this family's configs: the shared ones and each stack's layer list."""
        return (*moe_field_names(), *self.layer_fields)

    def select_moe_layers(self, dense_config: PretrainedConfig, specs: Mapping[str, object]) -> dict[str, list[int]]:
        """Each stack's MoE layers (by `layer_field`) from moefy's layer arguments (specs by argument name)."""
        foreign = [name for name, spec in specs.items() if spec is not None and name not in self.layer_arguments]
        if foreign:
            raise ValueError(
                f"{', '.join(foreign)}: not a layer choice of {self.name} models; they take "
                f"{', '.join(self.layer_arguments)}"
            )
        selected = {}
        for stack in self.stacks:
            spec = specs.get(stack.layer_field)
            if spec is None:
                spec = specs.get(SHARED_LAYER_FIELD)
            selected[stack.layer_field] = select_layers(
                spec, getattr(dense_config, stack.num_layers), stack.layer_field
            )
        return selected

    def report_layers(self, selected: Mapping[str, list[int]]) -> list[int] | dict[str, list[int]]:
        """`ConversionReport.moe_layers`: a list for a one-stack family, else a list per stack name."""
        if len(self.stacks) == 1:
            return list(selected[self.stacks[0].layer_field])
        return {stack.name: list(selected[stack.layer_field]) for stack in self.stacks}

    def dense_intermediate_size(self, dense: PreTrainedModel) -> int:
        """F, read off the dense weights of the first layer (what the FFN really has, whatever the config says)."""
        stack = self.stacks[0]
        values = {"layer": 0, **stack.placeholders}
        dense_state = dense.state_dict()
        kind, names = self._ffn_at(dense_state, _base_prefix(dense), values, where=f"{stack.name} layer 0")
        tensor = next(tensor for tensor in kind.tensors if tensor.neuron_axis is not None)
        shape = dense_state[names[tensor.key]].shape
        return (shape[::-1] if tensor.transpose else shape)[tensor.neuron_axis]

    def layer_plans(
        self, dense: PreTrainedModel, moe: PreTrainedModel, selected: Mapping[str, list[int]]
    ) -> list[LayerPlan]:
        """One plan per MoE block, stacks in declared order, layers ascending (the order random draws follow)."""
        dense_state = dense.state_dict()
        dense_prefix, moe_prefix = _base_prefix(dense), _base_prefix(moe)
        plans = []
        for stack in self.stacks:
            for layer in selected[stack.layer_field]:
                values = {"layer": layer, **stack.placeholders}
                block_name = self.block.format(**values)
                try:
                    block = moe.base_model.get_submodule(block_name)
                except AttributeError:
                    continue  # a head without this stack (T5EncoderModel has no decoder)
                if moe_part_kind(block) != "block":
                    raise RuntimeError(
                        f"moefy: {block_name} of {type(moe).__name__} should be an MoE block (moe_part 'block'), "
                        f"found a {type(block).__name__}; the {self.name} mapping's block template is wrong"
                    )
                kind, names = self._ffn_at(dense_state, dense_prefix, values, where=block_name)
                plans.append(LayerPlan(_qualified(moe_prefix, block_name), block, kind, MappingProxyType(names)))
        return plans

    def _ffn_at(
        self, dense_state: Mapping[str, torch.Tensor], prefix: str, values: Mapping[str, object], where: str
    ) -> tuple[FFNKind, dict[str, str]]:
        candidates = []
        for kind in self.ffn_kinds:
            names = {tensor.key: _qualified(prefix, tensor.dense.format(**values)) for tensor in kind.tensors}
            if all(name in dense_state for name in names.values()):
                candidates.append((kind, names))
        if len(candidates) != 1:
            expected = " or ".join(
                f"{kind.name} ({', '.join(tensor.dense.format(**values) for tensor in kind.tensors)})"
                for kind in self.ffn_kinds
            )
            found = "none" if not candidates else "several"
            raise RuntimeError(
                f"moefy: {where}: {found} of the {self.name} FFN kinds match the dense weights: {expected}"
            )
        return candidates[0]


def dense_config_fields(dense_config: PretrainedConfig) -> dict:
    """The dense config's fields that the MoE config keeps (not its identity: type, architectures, origin)."""
    fields = dense_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    return fields


def _base_prefix(model: PreTrainedModel) -> str:
    # transformers' own convention says which submodule is the base model; its qualified name prefixes every template
    base = model.base_model
    return next(name for name, module in model.named_modules() if module is base)


def router_and_expert_weight_names(model: nn.Module) -> set[str]:
    """The state-dict names of every router's and experts module's tensors of an MoE `model` (hash tables and expert
    biases included): the weights that have no dense counterpart of the same name, in either direction of conversion."""
    # every name of a module that several layers share (WideNet's experts): the state dict lists it under each
    return {
        _qualified(prefix, key)
        for prefix, module in model.named_modules(remove_duplicate=False)
        if moe_part_kind(module) in ("router", "experts")
        for key in module.state_dict()
    }


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}
