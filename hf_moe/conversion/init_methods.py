"""Dense-to-sparse initialization: E experts from one dense feed-forward network.

Shape legend: D hidden size, F dense intermediate size, E experts. A dense FFN arrives as named tensors in the
experts' layout without the expert dimension, each with the axis that indexes intermediate neurons (None for a tensor
that has none, like the output bias). A method returns the same names with a leading expert dimension.

Methods (chosen by name, `INIT_METHODS`):
- "copy": every expert is the dense FFN (sparse upcycling, Komatsuzaki et al. 2022).
- "noise": copy plus Gaussian noise with std = noise_scale * the weight's own std, independent per expert.
- "drop_upcycle": copy, then re-initialize a ratio r of each expert's intermediate neurons, a different random
  subset per expert, from the dense weights' mean and std (Drop-Upcycling, Nakamura et al. 2025).
- "split": partition the F neurons into E groups of F/E (MoEfication, Zhang et al. 2022; LLaMA-MoE); with all experts
  selected and unit combine weights the experts' outputs sum to the dense FFN's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["INIT_METHODS", "DenseFFN", "init_experts"]


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
}


def init_experts(
    ffn: DenseFFN, num_experts: int, method: str, generator: torch.Generator, **options
) -> dict[str, torch.Tensor]:
    """E experts' tensors (leading expert dim) from one dense FFN by the method `INIT_METHODS` names."""
    if method not in INIT_METHODS:
        raise ValueError(f"init method must be one of {tuple(INIT_METHODS)}, got {method!r}")
    return INIT_METHODS[method](ffn, num_experts, generator, **options)
