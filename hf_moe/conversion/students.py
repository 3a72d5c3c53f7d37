"""Mixture-of-Students (Rajbhandari et al. 2022, "DeepSpeed-MoE", arXiv 2201.05596, §4.2): a smaller MoE student made
from an MoE teacher by keeping some of its layers and some of its experts, to be distilled from it
(`hf_moe.DistillationTrainer`, with staged KD: `kd_stop_fraction`).

```
teacher (hf_moe GPT-2 / T5 MoE)                student (the same class)
layer layers[j] of each stack        ─copy─►   layer j (its MoE block stays MoE, its dense FFN dense)
experts[kept] of each MoE block      ─copy─►   experts 0 .. len(kept) - 1, in the order given
router rows [kept] (weight, noise,   ─copy─►   the router over the kept experts: softmax over their logits, i.e.
  expert bias)                                  the teacher's routing restricted to them (then top-k among them)
every other weight (embeddings, final norms, heads)   copied as it is
config: the teacher's with the stacks' layer counts, the remapped MoE layer lists and num_local_experts = len(kept)
```
Where a stack keeps its layers is the family mapping's block template up to `{layer}` (`h.{layer}` for GPT-2,
`{stack}.block.{layer}` for T5); nothing else about a family is needed, except one fact of T5: its relative position
bias lives only in block 0 of each stack, which computes it for every block. The student's block 0 therefore gets the
teacher's block 0 bias whichever layer it keeps there, so every kept layer sees the position bias it was trained with.

With every layer and every expert kept the student computes what the teacher computes. Kept experts' routing is the
teacher's restricted softmax, so with `normalize_top_k_weights` (k >= 2's default) and top-k among the kept the
combine weights are the teacher's renormalized over the kept experts; raw Switch probabilities (k = 1) are over the
kept experts only and so larger than the teacher's. Routers balanced by construction stay so over the kept experts:
BASE layers assign the tokens among them, expert choice gives each kept expert ceil(c * L / E') tokens with the new E'.

Refused (`ValueError` naming what and what is allowed): a layer index out of range or repeated, a stack left with no
layer, an expert index out of range or repeated, fewer kept experts than `num_experts_per_tok`, expert selection for
a hash router (its table sends token ids to experts by index: a dropped expert's tokens would have nowhere to go) or a
router registered outside hf_moe (its per-expert state is unknown), experts sharded by expert parallelism.

Shape legend: D hidden size, E teacher experts, E' kept experts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel

from ..modeling._compat import from_config_without_init
from ..modeling.moe_parts import moe_experts, moe_routers
from ..modeling.routing import TopKRouter
from ..modeling.routing_base import BaseLayerRouter
from ..modeling.routing_dense_to_sparse import DenseToSparseRouter
from ..modeling.routing_expert_choice import ExpertChoiceRouter
from ..modeling.routing_hash import HashRouter
from .dense_from_moe import _family_and_dense_class
from .family import FamilyMapping, Stack, _base_prefix, _qualified, dense_config_fields, router_and_expert_weight_names
from .layer_selection import select_layers

__all__ = ["mixture_of_students"]

_TOOL = "mixture_of_students"

# routers whose every tensor (weight, noise_weight, expert_bias) is one row per expert: kept by indexing dim 0
_ROWS_PER_EXPERT_ROUTERS = (TopKRouter, DenseToSparseRouter, ExpertChoiceRouter, BaseLayerRouter)

# per family, the weights (relative to a layer) only the first layer of a stack has and every layer uses
_FIRST_LAYER_ONLY = {"t5": ("layer.0.SelfAttention.relative_attention_bias.weight",)}

LayerSpec = str | Sequence[int] | None


def mixture_of_students(
    teacher: PreTrainedModel,
    layers: LayerSpec,
    experts: int | Sequence[int] | None = None,
    *,
    stack_layers: Mapping[str, LayerSpec] | None = None,
) -> PreTrainedModel:
    """A smaller MoE of the teacher's class: the chosen layers of the teacher, each MoE layer with the chosen experts.

    Args:
        teacher: an hf_moe GPT-2 or T5 MoE model (any head); it is not changed.
        layers: the teacher layers the student keeps in every stack, in `select_layers`' spec language ("all",
            "every_other" (1, 3, 5, ...), "top:N", "bottom:N", "0,2,5" or a list of ints); kept in ascending order.
        experts: the experts every MoE layer keeps: None, all of them; an int k, the first k; a list of indices, those
            experts in that order (e.g. the most used ones, from the routing counts the training metrics log).
        stack_layers: per stack name ("encoder", "decoder" for T5), a spec that replaces `layers` for that stack.

    Returns the student, on the teacher's device and dtype, in the teacher's training mode. Its config is the
    teacher's with fewer layers (`n_layer`; T5's `num_layers`, `num_decoder_layers`), the MoE layer lists renumbered
    (`moe_layers`; T5's `encoder_moe_layers`, `decoder_moe_layers`) and `num_local_experts` = the kept experts.
    """
    if not isinstance(teacher, PreTrainedModel):
        raise TypeError(f"{_TOOL} takes an hf_moe MoE model, got {type(teacher).__name__}")
    family, _ = _family_and_dense_class(teacher)
    config = teacher.config
    if config.num_experts_per_layer is not None:
        raise ValueError(
            f"{_TOOL} takes teachers with one expert count in every MoE layer; this one is a PR-MoE pyramid "
            f"(num_experts_per_layer={config.num_experts_per_layer}), whose layer and expert selection is not built yet"
        )
    kept_experts = _select_experts(experts, config.num_local_experts, config.num_experts_per_tok)
    subset = kept_experts != list(range(config.num_local_experts))
    _check_routers_and_experts(teacher, config, subset)

    base = teacher.base_model
    stacks = [stack for stack in family.stacks if _has_submodule(base, _layers_path(family, stack))]
    _check_stack_layers(family, stacks, stack_layers)
    fields = dense_config_fields(config)
    kept_layers = {}
    for stack in stacks:
        spec = (stack_layers or {}).get(stack.name, layers)
        num_layers = getattr(config, stack.num_layers)
        selected = select_layers(spec, num_layers, f"{stack.name} layers")
        if not selected:
            raise ValueError(f"{_TOOL}: layers={spec!r} keeps no layer of the {stack.name}; keep at least one")
        moe_layers = [i for i in range(num_layers) if _is_moe_layer(base, family, stack, i)]
        fields[stack.num_layers] = len(selected)
        fields[stack.layer_field] = [new for new, old in enumerate(selected) if old in moe_layers]
        kept_layers[stack.name] = selected
    fields["num_local_experts"] = len(kept_experts)
    student_config = type(config)(**fields)

    student = from_config_without_init(type(teacher), student_config, dtype=teacher.dtype)
    student.tie_weights()  # post_init's tying is skipped with the init under no_init_weights
    with torch.no_grad():
        _copy_weights(teacher, student, family, stacks, kept_layers, kept_experts if subset else None)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.to(teacher.device)
    student.train(teacher.training)
    return student


def _select_experts(experts, num_experts: int, top_k: int) -> list[int]:
    if experts is None:
        kept = list(range(num_experts))
    elif isinstance(experts, bool) or not isinstance(experts, (int, Sequence)) or isinstance(experts, str):
        raise TypeError(f"experts must be None, an int or a list of expert indices, got {experts!r}")
    elif isinstance(experts, int):
        if not 1 <= experts <= num_experts:
            raise ValueError(f"experts={experts}: the number of experts kept must be in [1, {num_experts}]")
        kept = list(range(experts))
    else:
        kept = list(experts)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in kept):
            raise TypeError(f"experts must hold int expert indices, got {experts!r}")
        if not kept or len(set(kept)) != len(kept) or any(not 0 <= i < num_experts for i in kept):
            raise ValueError(f"experts={kept}: indices must be unique, in [0, {num_experts}), at least one")
    if len(kept) < top_k:
        raise ValueError(
            f"{_TOOL}: experts keeps {len(kept)} expert(s) but each token uses num_experts_per_tok={top_k}; keep at "
            f"least {top_k} (or lower num_experts_per_tok on the teacher's config first)"
        )
    return kept


def _check_routers_and_experts(teacher: PreTrainedModel, config, subset: bool) -> None:
    for name, experts in moe_experts(teacher):
        if getattr(experts, "_is_expert_parallel", False):
            raise ValueError(
                f"{_TOOL}: {name} is sharded by expert parallelism (each rank holds some of the experts); load the "
                "teacher without distributed_config to make a student"
            )
    if not subset:
        return  # every router keeps its state as it is
    for name, router in moe_routers(teacher):
        if isinstance(router, HashRouter):
            raise ValueError(
                f"{_TOOL}: {name} is a hash router: its table sends token ids to experts by index, so the tokens of a "
                "dropped expert would have nowhere to go; keep every expert (experts=None) or choose layers only"
            )
        if not isinstance(router, _ROWS_PER_EXPERT_ROUTERS):
            allowed = ", ".join(cls.__name__ for cls in _ROWS_PER_EXPERT_ROUTERS)
            raise ValueError(
                f"{_TOOL}: {name} is a {type(router).__name__}, whose per-expert state is unknown here; experts can "
                f"be selected for routers with one row per expert ({allowed}); keep every expert (experts=None)"
            )


def _check_stack_layers(family: FamilyMapping, stacks: list[Stack], stack_layers) -> None:
    if stack_layers is None:
        return
    names = [stack.name for stack in stacks]
    unknown = [name for name in stack_layers if name not in names]
    if unknown:
        raise ValueError(f"stack_layers names {unknown}; this {family.name} model's stacks are {names}")


def _layers_path(family: FamilyMapping, stack: Stack) -> str:
    """Where a stack's layers are, relative to the base model: the block template up to `{layer}` ("h.", T5's
    "encoder.block.")."""
    return family.block.split("{layer}")[0].format(**stack.placeholders)


def _has_submodule(module, path: str) -> bool:
    try:
        module.get_submodule(path.rstrip("."))
    except AttributeError:
        return False  # a head without this stack (T5EncoderModel has no decoder)
    return True


def _is_moe_layer(base, family: FamilyMapping, stack: Stack, layer: int) -> bool:
    block = base.get_submodule(family.block.format(layer=layer, **stack.placeholders))
    return getattr(type(block), "moe_part", None) == "block"


def _copy_weights(teacher, student, family, stacks, kept_layers, kept_experts: list[int] | None) -> None:
    """Every student weight from its teacher counterpart; the routers' and experts' rows of the kept experts."""
    teacher_state = teacher.state_dict()
    prefix = _base_prefix(teacher)
    layer_paths = [(stack, _qualified(prefix, _layers_path(family, stack))) for stack in stacks]
    first_layer_only = _FIRST_LAYER_ONLY.get(family.name, ())
    per_expert = router_and_expert_weight_names(teacher)
    num_experts = teacher.config.num_local_experts
    for name, target in student.state_dict().items():
        source_name = name
        for stack, path in layer_paths:
            if name.startswith(path):
                index, _, rest = name[len(path) :].partition(".")
                # T5's relative position bias: block 0's, whichever teacher layer student block 0 keeps
                layer = 0 if rest in first_layer_only else kept_layers[stack.name][int(index)]
                source_name = f"{path}{layer}.{rest}"
                break
        if source_name not in teacher_state:
            raise RuntimeError(f"{_TOOL}: the student weight {name} has no teacher counterpart {source_name}")
        value = teacher_state[source_name]
        if kept_experts is not None and source_name in per_expert:
            assert value.shape[0] == num_experts, f"{source_name} {tuple(value.shape)} has no leading expert dim"
            value = value[kept_experts]  # (E, ...) -> (E', ...)
        if value.shape != target.shape:
            raise RuntimeError(
                f"{_TOOL}: the student's {name} is {tuple(target.shape)}, the teacher's {source_name} "
                f"{tuple(value.shape)}"
            )
        target.copy_(value)
