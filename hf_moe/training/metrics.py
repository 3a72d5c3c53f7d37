"""`RouterBalance`: an `evaluate.Metric` for how evenly a router spreads tokens over experts.

It works offline: instantiate the class (`RouterBalance()`), no `evaluate.load` from the Hub. Inputs are expert
assignments, one expert id per (token, expert) slot or one list of K ids per token, e.g. the `top_k_index` that
`torch.topk(router_logits, k)` gives, so it also scores routers outside hf_moe.
"""

from __future__ import annotations

import math

import datasets
import evaluate

__all__ = ["RouterBalance"]

_DESCRIPTION = """Router load balance from expert assignments: the fraction of assignments each expert received,
load imbalance (max / mean load, 1 is perfect), coefficient of variation of the load, the normalized entropy of the
load distribution (1 is uniform), and the number of experts that received nothing."""

_INPUTS = """
Args:
    expert_index: the expert chosen for each (token, expert) slot (int), or for each token the list of its K experts.
    num_experts (int, optional): the number of experts E; default: 1 + the largest id seen (pass it, or experts that
        never got a token are not counted as dead).
Returns:
    token_fraction (list of E floats), load_imbalance, cv, load_entropy (normalized to [0, 1]), dead_experts (int),
    num_assignments (int).
Example:
    >>> RouterBalance().compute(expert_index=[0, 1, 1, 3], num_experts=4)["load_imbalance"]
    2.0
"""


class RouterBalance(evaluate.Metric):
    """Load-balance statistics of expert assignments (see `_INPUTS` for the arguments and results)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            # two accepted layouts: flat slots, or one row of K experts per token
            features=[
                datasets.Features({"expert_index": datasets.Value("int64")}),
                datasets.Features({"expert_index": datasets.Sequence(datasets.Value("int64"))}),
            ],
            module_type="metric",
        )

    def _compute(self, expert_index, num_experts: int | None = None) -> dict:
        flat = (
            [e for row in expert_index for e in row]
            if expert_index and isinstance(expert_index[0], list)
            else list(expert_index)
        )
        if any(e < 0 for e in flat):
            raise ValueError(f"expert_index must be >= 0, got {min(flat)}")
        seen = max(flat) + 1 if flat else 0
        if num_experts is None:
            num_experts = seen
        elif num_experts < seen:
            raise ValueError(f"num_experts={num_experts} but expert_index contains expert {seen - 1}")
        if num_experts < 1 or not flat:
            raise ValueError("RouterBalance needs at least one expert assignment")
        load_E = [0] * num_experts
        for expert in flat:
            load_E[expert] += 1
        total = len(flat)
        mean = total / num_experts
        fraction_E = [count / total for count in load_E]
        variance = sum((count - mean) ** 2 for count in load_E) / num_experts
        entropy = -sum(p * math.log(p) for p in fraction_E if p > 0)
        return {
            "token_fraction": fraction_E,
            "load_imbalance": max(load_E) / mean,
            "cv": math.sqrt(variance) / mean,
            "load_entropy": entropy / math.log(num_experts) if num_experts > 1 else 1.0,
            "dead_experts": sum(count == 0 for count in load_E),
            "num_assignments": total,
        }
