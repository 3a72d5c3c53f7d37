"""Dense-to-sparse initialization: E experts from one dense feed-forward network.

Shape legend: D hidden size, F dense intermediate size, E experts, K experts per token (top-k), G granularity (shards
per dense FFN), V = E / G virtual groups. A dense FFN arrives as named tensors in the experts' layout without the
expert dimension, each with the axis that indexes intermediate neurons (None for a tensor that has none, like the
output bias). A method returns the same names with a leading expert dimension.

Methods (chosen by name, `INIT_METHODS`):
- "copy": every expert is the dense FFN (sparse upcycling, Komatsuzaki et al. 2022).
- "noise": copy plus Gaussian noise with std = noise_scale * the weight's own std, independent per expert.
- "drop_upcycle": copy, then re-initialize a ratio r of each expert's intermediate neurons, a different random
  subset per expert, from the dense weights' mean and std (Drop-Upcycling, Nakamura et al. 2025).
- "split": partition the F neurons into E groups of F/E (MoEfication, Zhang et al. 2022; LLaMA-MoE); with all experts
  selected and unit combine weights the experts' outputs sum to the dense FFN's output.
- "granular": cut the F neurons into G contiguous shards of F/G and copy each shard E/G times (granular upcycling,
  He et al. 2024, "Upcycling Large Language Models into Mixture of Experts", arXiv 2410.07524). Expert j*G + s holds
  shard s: the G consecutive experts j*G .. j*G+G-1 form virtual group j, one copy of the whole dense FFN.

Expert output scale (`expert_output_scale`). A token's MoE output is sum_e w_e * expert_e(x) over its K selected
experts. At init every selected expert gets about the same weight w: 1 (unit weights), 1/K (weights renormalized over
the K selected) or 1/E (raw softmax probabilities, the router starting near uniform). Each expert holds a share u of
the dense FFN: 1 for copies, 1/G for a granular shard, 1/E for a split part. So the output is K * w * u times the dense
output (for split: in expectation over uniformly random routing), and multiplying every expert's output projection
and output bias by

    c = 1 / (K * w * u)

restores the dense output. c is exact wherever w is exact at init: unit or normalized weights with whole copies or
whole virtual groups (copy: c = 1 or 1/K; granular: c = G or G/K). With raw softmax weights it holds in the limit of
a uniform router: for a token whose router logits span a range r, the K selected probabilities sum to between K/E
and K/E * exp(r), so the scaled output is between 1 and exp(r) times the dense output (copy: c = E/K, He et al.'s
factor; granular: c = E*G/K, Megatron-Core's pre-softmax factor). For split with K < E, c = E/K with unit weights
(LLaMA-MoE's factor, Zhu et al. 2024, arXiv 2406.16554) makes the output an unbiased estimate of the dense output:
each expert is selected with probability K/E under uniformly random routing, so the mean over all K-subsets of the
scaled sum is exactly the dense output. (LLaMA-MoE itself multiplies E/K onto weights renormalized over the K
selected experts; with those weights the same claim needs c = E, which is what this rule gives.)
The scale goes on the output projection only (not split between the two projections as Megatron-Core does), so it is
exact for every activation function, GELU and gated units included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch

__all__ = [
    "COMBINE_RULES",
    "INIT_METHODS",
    "OUTPUT_PROJECTION",
    "DenseFFN",
    "check_granularity",
    "choose_output_scale",
    "expert_output_scale",
    "init_experts",
    "scale_expert_outputs",
    "shared_experts_from_dense",
    "virtual_group_router_weight",
]

# how a token-choice router weighs its K selected experts (`TopKRouter`): weight 1 each, probabilities renormalized
# over the K, or the raw softmax probabilities
COMBINE_RULES = ("unit", "normalized", "softmax")
# the experts' output projection, by the experts contract's parameter name (transformers' `down_proj`); the scale
# goes there and on the output biases, so every expert's output is multiplied by it exactly
OUTPUT_PROJECTION = "down_proj"


@dataclass
class DenseFFN:
    """One dense FFN: tensors in the experts' layout (no expert dim) and each tensor's intermediate-neuron axis."""

    tensors: dict[str, torch.Tensor]
    neuron_axes: dict[str, int | None]
    # tensors added once per selected expert, outside any neuron: divided by E in "split" so the sum stays dense
    output_biases: tuple[str, ...] = ()

    @property
    def intermediate_size(self) -> int:
        name, axis = next((n, a) for n, a in self.neuron_axes.items() if a is not None)
        return self.tensors[name].shape[axis]


def _copy(ffn: DenseFFN, num_experts: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {name: t.unsqueeze(0).expand(num_experts, *t.shape).clone() for name, t in ffn.tensors.items()}


def _noise(
    ffn: DenseFFN, num_experts: int, generator: torch.Generator, noise_scale: float = 0.01
) -> dict[str, torch.Tensor]:
    experts = _copy(ffn, num_experts, generator)
    for name, tensor in ffn.tensors.items():
        if tensor.dim() < 2:  # biases stay exact: their std says little about a useful perturbation
            continue
        std = tensor.float().std().item()
        noise = torch.randn(experts[name].shape, generator=generator, dtype=torch.float32) * (noise_scale * std)
        experts[name] += noise.to(experts[name].dtype)
    return experts


def _drop_upcycle(
    ffn: DenseFFN, num_experts: int, generator: torch.Generator, drop_ratio: float = 0.5
) -> dict[str, torch.Tensor]:
    experts = _copy(ffn, num_experts, generator)
    num_neurons = ffn.intermediate_size
    num_dropped = round(drop_ratio * num_neurons)
    for expert in range(num_experts):
        # one subset per expert, shared by all of its tensors, so a re-initialized neuron is new end to end
        dropped_F = torch.randperm(num_neurons, generator=generator)[:num_dropped]
        for name, tensor in ffn.tensors.items():
            axis = ffn.neuron_axes[name]
            if axis is None:
                continue
            mean, std = tensor.float().mean().item(), tensor.float().std().item()
            target = experts[name][expert]
            shape = list(target.shape)
            shape[axis] = num_dropped
            fresh = torch.randn(shape, generator=generator, dtype=torch.float32) * std + mean
            target.index_copy_(axis, dropped_F, fresh.to(target.dtype))
    return experts


def _split(
    ffn: DenseFFN, num_experts: int, generator: torch.Generator, partition: str = "random"
) -> dict[str, torch.Tensor]:
    num_neurons = ffn.intermediate_size
    if num_neurons % num_experts:
        raise ValueError(
            f"init='split' partitions the {num_neurons} intermediate neurons into num_experts={num_experts} equal "
            "groups; choose a number of experts that divides it"
        )
    groups_EG = _partition_neurons(ffn, num_experts, generator, partition)
    experts = {}
    for name, tensor in ffn.tensors.items():
        axis = ffn.neuron_axes[name]
        if axis is None:
            scale = 1.0 / num_experts if name in ffn.output_biases else 1.0
            experts[name] = (tensor * scale).unsqueeze(0).expand(num_experts, *tensor.shape).clone()
        else:
            experts[name] = torch.stack([tensor.index_select(axis, group) for group in groups_EG])
    return experts


def _granular(
    ffn: DenseFFN, num_experts: int, generator: torch.Generator, granularity: int = 1
) -> dict[str, torch.Tensor]:
    # `generator` is unused: the shards are contiguous (as in He et al. and Megatron-Core), so the experts need no
    # random choice; the virtual groups' router rows are drawn by `virtual_group_router_weight`
    num_neurons = ffn.intermediate_size
    check_granularity(num_experts, None, granularity, num_neurons)
    shard_size = num_neurons // granularity
    experts = {}
    for name, tensor in ffn.tensors.items():
        axis = ffn.neuron_axes[name]
        if axis is None:
            # an output bias is added once per selected expert: 1/G in each shard, so one virtual group adds it once
            scale = 1.0 / granularity if name in ffn.output_biases else 1.0
            shards = [tensor * scale] * granularity
        else:
            shards = list(tensor.split(shard_size, dim=axis))
        # expert e holds shard e % G: virtual group j is experts j*G .. j*G+G-1, one copy of each shard
        experts[name] = torch.stack([shards[expert % granularity] for expert in range(num_experts)]).contiguous()
    return experts


def _partition_neurons(ffn: DenseFFN, num_experts: int, generator: torch.Generator, partition: str) -> torch.Tensor:
    """Neuron indices of each expert, (E, F/E): a random partition, or balanced k-means on the neurons' input
    weights (MoEfication's parameter clustering: neurons that read similar directions fire together)."""
    num_neurons = ffn.intermediate_size
    group_size = num_neurons // num_experts
    if partition == "random":
        return torch.randperm(num_neurons, generator=generator).view(num_experts, group_size)
    if partition != "clustered":
        raise ValueError(f"split partition must be 'random' or 'clustered', got {partition!r}")
    name, axis = next((n, a) for n, a in ffn.neuron_axes.items() if a is not None and ffn.tensors[n].dim() == 2)
    vectors_FD = ffn.tensors[name].float().movedim(axis, 0)
    vectors_FD = vectors_FD / vectors_FD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    centroids_ED = vectors_FD[torch.randperm(num_neurons, generator=generator)[:num_experts]]
    for _ in range(10):  # a few Lloyd steps; the balanced assignment below does the rest
        assignment_F = torch.cdist(vectors_FD, centroids_ED).argmin(dim=-1)
        for expert in range(num_experts):
            members = vectors_FD[assignment_F == expert]
            if len(members):
                centroids_ED[expert] = members.mean(dim=0)
    # balanced assignment: take (neuron, expert) pairs from the closest, skipping full experts and placed neurons
    distances_FE = torch.cdist(vectors_FD, centroids_ED)
    order = torch.argsort(distances_FE.reshape(-1)).tolist()
    fill = [0] * num_experts
    groups: list[list[int]] = [[] for _ in range(num_experts)]
    placed = [False] * num_neurons
    for flat in order:
        neuron, expert = divmod(flat, num_experts)
        if placed[neuron] or fill[expert] == group_size:
            continue
        placed[neuron] = True
        fill[expert] += 1
        groups[expert].append(neuron)
    return torch.tensor([sorted(group) for group in groups])


INIT_METHODS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "copy": _copy,
    "noise": _noise,
    "drop_upcycle": _drop_upcycle,
    "split": _split,
    "granular": _granular,
}


def init_experts(
    ffn: DenseFFN, num_experts: int, method: str, generator: torch.Generator, **options
) -> dict[str, torch.Tensor]:
    """E experts' tensors (leading expert dim) from one dense FFN by the method `INIT_METHODS` names."""
    if method not in INIT_METHODS:
        raise ValueError(f"init method must be one of {tuple(INIT_METHODS)}, got {method!r}")
    return INIT_METHODS[method](ffn, num_experts, generator, **options)


def check_granularity(num_experts: int, top_k: int | None, granularity, intermediate_size: int | None = None) -> None:
    """`ValueError`/`TypeError` naming the argument unless G shards of F / G neurons, each copied E / G times, can give
    every token exactly K / G whole virtual groups (`top_k` or `intermediate_size` None: not checked)."""
    if isinstance(granularity, bool) or not isinstance(granularity, int):
        raise TypeError(f"granularity must be an int >= 1, got {granularity!r} ({type(granularity).__name__})")
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    if num_experts % granularity:
        raise ValueError(
            f"init='granular' copies each of granularity={granularity} shards num_experts / granularity times: "
            f"num_experts={num_experts} must be a multiple of granularity"
        )
    if top_k is not None and top_k % granularity:
        raise ValueError(
            f"init='granular' is function-preserving when each token selects whole virtual groups of "
            f"granularity={granularity} experts (one copy of every shard): top_k={top_k} must be a multiple of "
            "granularity"
        )
    if intermediate_size is not None and intermediate_size % granularity:
        raise ValueError(
            f"init='granular' cuts the {intermediate_size} intermediate neurons into granularity={granularity} equal "
            "shards; choose a granularity that divides it"
        )


def expert_output_scale(method: str, combine: str, num_experts: int, top_k: int, granularity: int = 1) -> Fraction:
    """c = 1 / (K * w * u) (see the module docstring): w the weight of one selected expert at a uniform router, u the
    share of the dense FFN one expert holds. A `Fraction`, so that an exact case is exactly 1."""
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
    weight = {"unit": Fraction(1), "normalized": Fraction(1, top_k), "softmax": Fraction(1, num_experts)}[combine]
    share = {"split": Fraction(1, num_experts), "granular": Fraction(1, granularity)}.get(method, Fraction(1))
    return 1 / (top_k * weight * share)


def choose_output_scale(
    method: str,
    scale_weights: bool | None,
    *,
    combine: str | None,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
) -> float:
    """The factor moefy multiplies into every expert's output projection and output bias (1.0: none), from the init
    method, the user's `scale_weights` (None: the method's default) and the router's combine rule (None: a router
    that does not combine by token-choice softmax weights). `ValueError` where scale_weights does not apply.

    Defaults: "granular" always applies its factor (without it the model is not the dense one); "split" applies E/K
    (LLaMA-MoE); the copy methods apply none (copies with weights that sum to 1 are already the dense FFN).
    """
    if scale_weights is not None and not isinstance(scale_weights, bool):
        raise TypeError(f"scale_weights must be True, False or None, got {scale_weights!r}")
    if combine is None:
        if method == "granular":
            raise ValueError(
                "init='granular' needs a token-choice softmax router (router_type 'topk' or 'noisy_topk'): its "
                "virtual groups work through the router's shared rows and top-k"
            )
        if scale_weights:
            raise ValueError(
                "scale_weights applies to the token-choice softmax routers (topk, noisy_topk), whose combine weights "
                "it compensates; this router combines its experts otherwise"
            )
        return 1.0
    factor = expert_output_scale(method, combine, num_experts, top_k, granularity)
    if method == "granular":
        if combine == "softmax":
            if not scale_weights:
                raise ValueError(
                    "init='granular' is function-preserving with normalized combine weights (its default) or unit "
                    "weights; with normalize_top_k_weights=False the output matches the dense one only in magnitude, "
                    f"at a uniform router: pass scale_weights=True for that (factor E*G/K = {float(factor):g}), or "
                    "leave normalize_top_k_weights unset"
                )
            return float(factor)
        if scale_weights is not None:
            raise ValueError(
                f"scale_weights does not apply to init='granular' with {combine} combine weights: the recipe always "
                f"scales the expert outputs by its exact factor {float(factor):g}, which makes it function-preserving; "
                "leave scale_weights unset"
            )
        return float(factor)
    if scale_weights is False or (scale_weights is None and method != "split"):
        return 1.0
    if factor == 1:
        if method == "split":
            if scale_weights is None:
                return 1.0
            why = "every expert is selected with weight 1, so the parts already sum to the dense FFN"
        elif combine == "unit":
            why = "top_k=1 with unit weights: the one selected copy is the dense FFN"
        elif combine == "normalized":
            why = "the selected experts' weights are renormalized to sum to 1, so the copies already give the dense output"
        else:
            why = "with top_k == num_experts the softmax weights of all experts sum to 1"
        raise ValueError(
            f"scale_weights=True does not apply to init={method!r} with {combine} combine weights: {why}. It applies to "
            "raw softmax weights (normalize_top_k_weights=False, top_k < num_experts; factor E/K), to unit weights "
            "with top_k > 1 (factor 1/K) and to split with top_k < num_experts"
        )
    return float(factor)


def shared_experts_from_dense(ffn: DenseFFN, num_shared: int, output_scale: float) -> dict[str, torch.Tensor]:
    """`num_shared` copies of the dense FFN as one FFN of their summed width (by `ffn`'s keys, no expert dim): every
    neuron tensor repeated along its neuron axis, the output biases added once per copy (times `num_shared`), and the
    output multiplied by `output_scale`. Its output is `num_shared * output_scale * dense(x)`."""
    tensors = {}
    for name, tensor in ffn.tensors.items():
        axis = ffn.neuron_axes[name]
        tensors[name] = tensor * num_shared if axis is None else torch.cat([tensor] * num_shared, dim=axis)
    with_expert_dim = {name: tensor.unsqueeze(0) for name, tensor in tensors.items()}
    scale_expert_outputs(with_expert_dim, ffn, output_scale)
    return {name: tensor.squeeze(0) for name, tensor in with_expert_dim.items()}


def scale_expert_outputs(experts: dict[str, torch.Tensor], ffn: DenseFFN, scale: float) -> None:
    """Multiply every expert's output (its output projection and output biases) by `scale`, in place."""
    if scale == 1.0:
        return
    if OUTPUT_PROJECTION not in experts:
        raise RuntimeError(f"no {OUTPUT_PROJECTION!r} among the experts' tensors {sorted(experts)} to scale")
    for name in (OUTPUT_PROJECTION, *ffn.output_biases):
        experts[name].mul_(scale)


def virtual_group_router_weight(
    num_experts: int, granularity: int, hidden_size: int, std: float, generator: torch.Generator
) -> torch.Tensor:
    """Router weight (E, D) for "granular": the G experts of a virtual group share one row, so they share one logit
    and the top-k takes whole groups.

    Sharing a row is not enough in float32: a GEMM may round identical rows differently by column (measured on CPU:
    E=6, G=3 gives logits up to 2e-6 apart), and a top-k boundary between two close groups could then split one. So
    each group's row has a single nonzero entry, at a hidden coordinate of its own: its logit is one product, rounded
    once, identical in every column whatever the kernel's summation order. The entry is N(0, (std * sqrt(D))^2),
    which gives the logits the spread of a dense N(0, std^2) row (the same E[logit^2] = std^2 * |x|^2).
    """
    num_groups = num_experts // granularity
    coordinates_V = torch.randperm(hidden_size, generator=generator).repeat(math.ceil(num_groups / hidden_size))
    values_V = torch.randn(num_groups, generator=generator, dtype=torch.float32) * (std * math.sqrt(hidden_size))
    weight_VD = torch.zeros(num_groups, hidden_size)
    weight_VD[torch.arange(num_groups), coordinates_V[:num_groups]] = values_V
    return weight_VD.repeat_interleave(granularity, dim=0)
