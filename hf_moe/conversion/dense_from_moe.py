"""dense_from_moe: the inverse of moefy, an hf_moe GPT-2 / T5 MoE model -> the dense transformers model of its family.

The student initialization of MoE -> dense distillation (Fedus et al. 2021, "Switch Transformers", arXiv 2101.03961,
§4: copying the teacher's non-expert weights was their best init). What it knows about a family is moefy's declared
`FamilyMapping` (`gpt2.py`, `t5.py`), read the other way:

```
MoE (hf_moe)                                  dense (transformers)
GPT2MoeForCausalLM / T5MoeFor...               the family's source class the MoE class was made from
config: the MoE config minus the MoE fields    GPT2Config / T5Config
every weight but routers and experts          the same name, copied exactly (a leftover on either side: an error)
experts.up_proj (E, D, F) of h.{i}.mlp   ─ffn─► h.{i}.mlp.c_fc.weight (D, F)     ffn="mean": the mean of the E
experts.gate_up_proj (E, 2F, D)          ─ffn─► wi_0 / wi_1 (F, D) each          experts; ffn=i: expert i
experts.down_proj, output biases         ─ffn─► × fold (below)
```

Fold. A token's MoE output is sum_k w_k * expert_k(x) over its K experts. At a uniform router with every expert equal
to the chosen FFN that is K * w times the FFN's output, w being one expert's combine weight there: 1 (unit weights,
hash layers), 1/K (normalized over the K) or 1/E (raw softmax probabilities). The dense FFN is that MoE: its output
projection and output bias are the chosen ones times K * w, which is 1 / `init_methods.expert_output_scale` of a copy.
So moefy's `scale_weights` factor is undone, and a copy-upcycled MoE whose combine weights sum to 1 gives back its
dense model bit for bit. For a trained MoE it is what the name says: a dense FFN made from the experts, an init.

Refused (`ValueError` naming what and what is allowed):
- `ffn` other than "mean" or an expert index in [0, E);
- experts narrower or wider than the dense FFN (`moe_intermediate_size`: split and granular upcycling, MultiHash):
  each is a part of a dense FFN, so neither one of them nor their mean is a dense FFN of the config's width;
- routers whose combine weight depends on the token in a way no dense FFN computes: BASE layers (sigmoid of the
  token's score), expert choice (a variable number of experts per token), the dense-to-sparse gate, and any
  registered router that is neither token-choice softmax top-k nor a hash layer;
- experts sharded by expert parallelism (each rank holds only some experts).

Shape legend: D hidden size, F intermediate size (dense = expert), E experts, K experts per token.
"""

from __future__ import annotations

import copy

import torch
import transformers
from transformers import PreTrainedModel

from ..modeling._compat import from_config_without_init
from ..modeling.moe_parts import moe_blocks, moe_experts, moe_parts
from ..modeling.registry import ROUTERS
from ..modeling.routing import TopKRouter
from ..modeling.routing_hash import HashRouter
from .family import FamilyMapping, LayerPlan, dense_config_fields, router_and_expert_weight_names
from .init_methods import OUTPUT_PROJECTION, expert_output_scale
from .moefy import FAMILIES, _combine_rule

__all__ = ["dense_from_moe"]

_TOOL = "dense_from_moe"


def dense_from_moe(model: PreTrainedModel, ffn: str | int = "mean") -> PreTrainedModel:
    """The dense transformers model of an hf_moe MoE model: every non-expert weight copied, each MoE layer's FFN made
    from its experts.

    Args:
        model: an hf_moe GPT-2 or T5 MoE model (any head moefy makes: GPT2MoeForCausalLM -> GPT2LMHeadModel,
            T5MoeForConditionalGeneration -> T5ForConditionalGeneration, ...), also one loaded with
            `trust_remote_code`. It is not changed.
        ffn: "mean" (the mean of each layer's experts, taken in float64) or an expert index i (expert i of every MoE
            layer). The output projection and bias are then multiplied by the fold factor K * w (module docstring).

    Returns the dense model in the MoE model's dtype, device and training mode, with its generation config and loss
    type. Its config
    is the MoE config without the MoE fields (for T5 that keeps `scale_decoder_outputs`, so an MoE made from mT5
    becomes a T5 model that computes what the mT5 model did). Training-only differences: T5's dense FFN applies the
    config's `dropout_rate` where the experts applied `expert_dropout`.
    """
    family, dense_class_name = _family_and_dense_class(model)
    config = model.config
    # a PR-MoE pyramid: an expert index must exist in every layer
    num_experts = min(config.experts_per_layer) if config.num_moe_layers else config.num_local_experts
    if ffn != "mean" and (isinstance(ffn, bool) or not isinstance(ffn, int) or not 0 <= ffn < num_experts):
        counts = "num_local_experts" if config.num_experts_per_layer is None else "the fewest of num_experts_per_layer"
        raise ValueError(
            f"{_TOOL}: ffn must be 'mean' or an expert index in [0, {num_experts}) ({counts}={num_experts}), "
            f"got {ffn!r}"
        )
    if config.num_shared_experts or config.residual_moe:
        # a dense FFN of the dense width has no room for the shared experts beside the routed ones' mean
        what = "Residual-MoE's dense MLP" if config.residual_moe else f"{config.num_shared_experts} shared experts"
        raise ValueError(
            f"{_TOOL} cannot fold {what} into a dense FFN of the dense width beside the routed experts; "
            "hf_moe.mixture_of_students keeps them in a smaller MoE student"
        )
    _fold_factor(config, config.num_local_experts)  # refuses what cannot be folded before anything is built
    for name, experts in moe_experts(model):
        if getattr(experts, "_is_expert_parallel", False):
            raise ValueError(
                f"{_TOOL}: {name} is sharded by expert parallelism (each rank holds some of the experts); load the "
                "model without distributed_config to convert it"
            )

    dense_class = getattr(transformers, dense_class_name)
    moe_fields = set(family.moe_config_fields)
    fields = {key: value for key, value in dense_config_fields(config).items() if key not in moe_fields}
    dense = from_config_without_init(dense_class, dense_class.config_class(**fields), dtype=model.dtype)
    dense.tie_weights()  # post_init's tying is skipped with the init under no_init_weights

    selected = family.select_moe_layers(
        config, {stack.layer_field: getattr(config, stack.layer_field) for stack in family.stacks}
    )
    # the mapping is read MoE -> dense: its "dense names" are the dense model's, its blocks the MoE model's
    plans = family.layer_plans(dense, model, selected)
    unplanned = [name for name, block in moe_blocks(model) if all(block is not plan.block for plan in plans)]
    if unplanned:
        raise RuntimeError(
            f"{_TOOL}: the {family.name} mapping finds no place in {dense_class_name} for the MoE blocks {unplanned}"
        )
    with torch.no_grad():
        dense_state = dense.state_dict()
        _copy_shared_weights(model, dense_state, plans)
        for plan in plans:
            # the layer's own expert count (a pyramid's differ), on which the folded combine weight depends
            _write_dense_ffn(plan, dense_state, ffn, _fold_factor(config, plan.block.num_experts))
    if getattr(model, "generation_config", None) is not None:
        dense.generation_config = copy.deepcopy(model.generation_config)
    # transformers picks a model's loss by its class name and "GPT2LMHeadModel" names none: the MoE's (named by its
    # class) keeps the causal loss without a warning, and Trainer counting the shifted labels (see hf_moe.demo)
    dense.loss_type = model.loss_type
    dense.to(model.device)
    dense.train(model.training)
    return dense


def _family_and_dense_class(model) -> tuple[FamilyMapping, str]:
    """The family and the dense class name the MoE class was made from (by class name: remote-code copies match)."""
    name = type(model).__name__
    inverses = {}
    for family in FAMILIES.values():
        for source_name, target_class in family.target_classes.items():
            # T5 and mT5 sources share their MoE classes: the first, T5's, is the inverse (mT5 is T5 without scaling)
            inverses.setdefault(target_class.__name__, (family, source_name))
    if name not in inverses:
        raise ValueError(f"{_TOOL} converts the hf_moe MoE models {', '.join(inverses)}; got a {name}")
    return inverses[name]


def _fold_factor(config, num_experts: int) -> float:
    """K * w: the output of an MoE layer of `num_experts` experts at a uniform router with every expert equal to one
    FFN, in units of that FFN."""
    router_class = ROUTERS.entry(config.router_type).router_class
    top_k = config.num_experts_per_tok
    if issubclass(router_class, HashRouter):
        combine = "unit"  # a fixed table, weight 1 for each of the num_hash_heads experts
    elif issubclass(router_class, TopKRouter):
        combine = _combine_rule(config)
    else:
        allowed = [name for name, entry in ROUTERS.items() if issubclass(entry.router_class, (TopKRouter, HashRouter))]
        raise ValueError(
            f"{_TOOL}: router_type={config.router_type!r} weighs a token's experts by how that token was routed, "
            f"which no dense FFN computes; it inverts router_type in {tuple(allowed)} (token-choice softmax top-k and "
            "hash layers, whose combine weights at a uniform router are a constant it folds into the FFN)"
        )
    if config.moe_intermediate_size is not None:
        _check_expert_width(config)
    return float(1 / expert_output_scale("copy", combine, num_experts, top_k))


def _check_expert_width(config) -> None:
    # the dense config's width: GPT-2's n_inner (4 * n_embd when unset), T5's d_ff
    dense_width = getattr(config, "dense_intermediate_size", None) or config.d_ff
    if config.moe_intermediate_size != dense_width:
        raise ValueError(
            f"{_TOOL}: the experts have moe_intermediate_size={config.moe_intermediate_size} neurons, the dense FFN "
            f"{dense_width}: each expert is a part of a dense FFN (split or granular upcycling, MultiHash), so neither "
            "one expert nor their mean is a dense FFN of that width; it inverts MoE models whose experts are as wide "
            "as the dense FFN (moe_intermediate_size None or equal to it)"
        )


def _copy_shared_weights(moe: PreTrainedModel, dense_state: dict, plans: list[LayerPlan]) -> None:
    """Copy every MoE weight that keeps its name; fail loudly on a weight of either model that has no counterpart."""
    moe_state = moe.state_dict()
    written = {name for plan in plans for name in plan.dense_names.values()}
    # routers (hash tables, expert biases included) and experts have no dense counterpart of their own
    expert_only = router_and_expert_weight_names(moe)
    for name, target in dense_state.items():
        if name in written:
            continue
        if name not in moe_state or moe_state[name].shape != target.shape:
            raise RuntimeError(f"{_TOOL}: the dense weight {name} {tuple(target.shape)} has no MoE counterpart")
        target.copy_(moe_state[name])
    lost = set(moe_state) - set(dense_state) - expert_only
    if lost:
        raise RuntimeError(f"{_TOOL}: these MoE weights have no place in the dense model: {sorted(lost)}")


def _write_dense_ffn(plan: LayerPlan, dense_state: dict, ffn: str | int, fold: float) -> None:
    (_, experts), *others = moe_parts(plan.block, "experts")
    if others:
        raise RuntimeError(f"{_TOOL}: the MoE block {plan.label} has {len(others) + 1} experts parts, expected one")
    parameters = dict(experts.named_parameters())
    for tensor in plan.kind.tensors:
        value = parameters[tensor.expert]  # (E, ...), several parts concatenated along their neuron axis
        if tensor.part is not None:
            num_parts = sum(other.expert == tensor.expert for other in plan.kind.tensors)
            # +1: the leading expert dim; T5 gated: (E, 2F, D) -> [wi_0 (E, F, D), wi_1 (E, F, D)]
            value = value.chunk(num_parts, dim=tensor.neuron_axis + 1)[tensor.part]
        # float64: the mean of E equal copies is that copy exactly, for any E
        value = value.to(torch.float64).mean(dim=0) if ffn == "mean" else value[ffn]
        if fold != 1.0 and (tensor.expert == OUTPUT_PROJECTION or tensor.output_bias):
            value = value.to(torch.float64) * fold
        if tensor.transpose:
            value = value.t()
        target = dense_state[plan.dense_names[tensor.key]]
        if target.shape != value.shape:
            raise RuntimeError(
                f"{_TOOL}: {plan.label}.experts.{tensor.expert} gives {tuple(value.shape)} per expert, the dense "
                f"{plan.dense_names[tensor.key]} is {tuple(target.shape)}"
            )
        target.copy_(value)
