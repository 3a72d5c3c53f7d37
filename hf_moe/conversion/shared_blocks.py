"""moefy into a WideNet model (`share_blocks_across_layers=True`): where every layer of a stack applies one block, the
dense layers' weights have to become one. `shared_block_start` collapses them before the conversion reads them:

```
"mean" (default)  each shared weight = the mean over the layers that apply it (of the dense attention, the dense FFNs
                  the experts are made from, the dense MLPs of layers that stay dense): the single block closest to
                  all of them in squared weight distance, so no layer's weights are thrown away
j (an int)        each shared weight = block j's (in every stack): the model is dense block j repeated, with each
                  layer's own LayerNorms; a weight block j does not have (a dense MLP when block j is MoE, or the
                  other way round) comes from the first block that has it
```

Neither keeps the dense model's function: sharing changes the function (every layer's LayerNorms stay its own). The
experts are then made from the collapsed FFN by the chosen init, as in every layer of an unshared conversion.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from ..modeling.moe_parts import moe_parts
from ..modeling.shared_blocks import shared_block_groups
from .family import FamilyMapping, LayerPlan

__all__ = ["check_shared_block_init", "shared_block_start"]


def check_shared_block_init(shared_block_init, config, router_init: str, family: FamilyMapping) -> None:
    """`ValueError` for a `shared_block_init` that cannot apply to `config` (the MoE config moefy builds)."""
    if not config.share_blocks_across_layers:
        if shared_block_init != "mean":
            raise ValueError(
                f"shared_block_init={shared_block_init!r} says how shared blocks start; it needs "
                "share_blocks_across_layers=True"
            )
        return
    stack_sizes = [getattr(config, stack.num_layers) for stack in family.stacks]
    is_index = isinstance(shared_block_init, int) and not isinstance(shared_block_init, bool)
    if shared_block_init != "mean" and not (is_index and 0 <= shared_block_init < min(stack_sizes)):
        raise ValueError(
            f"shared_block_init must be 'mean' or a block index in [0, {min(stack_sizes)}) (a block of every stack), "
            f"got {shared_block_init!r}"
        )
    if router_init != "random" and not config.per_layer_router:
        raise ValueError(
            f"router_init={router_init!r} fits each layer's router to that layer's dense FFN inputs; under "
            "share_blocks_across_layers one router serves every layer: use router_init='random' or "
            "per_layer_router=True"
        )


def shared_block_start(
    dense_state: Mapping[str, torch.Tensor], moe: PreTrainedModel, plans: list[LayerPlan], shared_block_init
) -> dict[str, torch.Tensor]:
    """A copy of `dense_state` in which every group of dense weights that `moe` shares holds one value (see the module
    docstring); the names stay, so the conversion reads them as usual."""
    state = dict(dense_state)
    plan_by_expert_weight = {
        f"{plan.label}.{experts_name}.{weight}": plan
        for plan in plans
        for experts_name, experts in moe_parts(plan.block, "experts")
        for weight, _ in experts.named_parameters()
    }
    collapsed_plans = set()
    for group in shared_block_groups(moe):
        names = dict(group)  # block index -> name
        if all(name in dense_state for name in names.values()):  # a weight that keeps its name (attention, dense MLP)
            value = _collapse({index: dense_state[name] for index, name in names.items()}, shared_block_init)
            state.update(dict.fromkeys(names.values(), value))
            continue
        group_plans = {index: plan_by_expert_weight.get(name) for index, name in names.items()}
        labels = tuple(plan.label for plan in group_plans.values() if plan is not None)
        if None in group_plans.values() or labels in collapsed_plans:
            continue  # a router, shared experts or the Residual-MoE coefficient: no dense counterpart; or done
        collapsed_plans.add(labels)
        # the dense FFN tensors the experts of these layers are made from
        for key in next(iter(group_plans.values())).dense_names:
            members = {index: plan.dense_names[key] for index, plan in group_plans.items()}
            value = _collapse({index: dense_state[name] for index, name in members.items()}, shared_block_init)
            state.update(dict.fromkeys(members.values(), value))
    return state


def _collapse(tensors: dict[int, torch.Tensor], shared_block_init) -> torch.Tensor:
    if shared_block_init == "mean":
        # summed in float64: the mean of identical copies is that copy, bit for bit
        first = next(iter(tensors.values()))
        return torch.stack([tensor.double() for tensor in tensors.values()]).mean(0).to(first.dtype)
    return tensors.get(shared_block_init, tensors[min(tensors)])
