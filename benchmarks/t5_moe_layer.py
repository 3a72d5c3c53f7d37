"""Time the T5 MoE feed-forward block (forward + backward, fp32, CPU) against transformers' Switch Transformers layer.

Shape legend: B batch, S sequence, T = B*S tokens, D d_model, F d_ff (expert hidden size), E experts.

Every row is one case, top-1 routing with capacity; the same seeded input `x_BSD` and output gradient go through

- `dense`:  transformers' `T5DenseActDense` (wi -> relu -> wo, width F): the active FLOPs of a top-1 MoE layer;
- `switch`: transformers' `SwitchTransformersSparseMLP` (one-hot dispatch mask, a Python loop over the experts hit),
            `expert_capacity` = ceil(capacity_factor * S / E) slots per expert and per sequence;
- `ours`:   hf_moe's `SparseMoeBlock(config, T5MoeExperts(config))` with the same router and expert weights, once
            per experts implementation (`hf_moe_auto`, the default, `grouped_mm` and `eager`), with Switch's
            capacity: the same `expert_capacity` per expert and per sequence (`capacity_scope="sequence"`), so both drop the same tokens.

Ratios are of the fastest of the timed steps, measured side by side in one run (round-robin, so drift hits every
layer alike).
Run `python benchmarks/t5_moe_layer.py` (small shapes, well under 2 minutes on 2 cores) or add `--large`
(T5-base FFN shapes, Switch-base-8 / -32 expert counts).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import SwitchTransformersConfig, T5Config
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP
from transformers.models.t5.modeling_t5 import T5DenseActDense

from hf_moe import SparseMoeBlock, T5MoeConfig
from hf_moe.modeling import AUTO_EXPERTS_IMPLEMENTATION, T5MoeExperts

ROUTER_INIT_STD = 0.02  # T5MoeConfig's default router_init_std: routing starts near uniform, as when training starts


@dataclass(frozen=True)
class Case:
    batch: int
    seq_len: int
    d_model: int
    d_ff: int
    num_experts: int
    capacity_factor: float = 1.25  # Switch's training capacity factor

    @property
    def name(self) -> str:
        return f"B{self.batch}xS{self.seq_len} D{self.d_model} F{self.d_ff} E{self.num_experts}"

    @property
    def switch_capacity(self) -> int:
        return math.ceil(self.capacity_factor * self.seq_len / self.num_experts)


def small_cases() -> list[Case]:
    """Overhead-bound shapes (256-1024 tokens, D <= 256), where per-expert loops and host syncs show."""
    return [
        Case(batch=8, seq_len=32, d_model=64, d_ff=256, num_experts=8),
        Case(batch=8, seq_len=32, d_model=64, d_ff=256, num_experts=32),
        Case(batch=8, seq_len=128, d_model=256, d_ff=1024, num_experts=8),
    ]


def large_cases() -> list[Case]:
    """T5-base FFN shapes (D=768, F=3072) at 4096 tokens, with Switch-base-8 and Switch-base-32 expert counts."""
    return [
        Case(batch=8, seq_len=512, d_model=768, d_ff=3072, num_experts=8),
        Case(batch=8, seq_len=512, d_model=768, d_ff=3072, num_experts=32),
    ]


@torch.no_grad()
def build_layers(case: Case) -> dict[str, nn.Module]:
    switch_config = SwitchTransformersConfig(
        d_model=case.d_model,
        d_ff=case.d_ff,
        num_experts=case.num_experts,
        expert_capacity=case.switch_capacity,
        dropout_rate=0.0,
        router_jitter_noise=0.0,
    )
    switch = SwitchTransformersSparseMLP(switch_config)
    switch.router.classifier.weight.normal_(0.0, ROUTER_INIT_STD)
    for expert in switch.experts.values():
        expert.wi.weight.normal_(0.0, case.d_model**-0.5)
        expert.wo.weight.normal_(0.0, case.d_ff**-0.5)

    layers: dict[str, nn.Module] = {"switch": switch}
    for implementation in (AUTO_EXPERTS_IMPLEMENTATION, "grouped_mm", "eager"):
        config = T5MoeConfig(
            d_model=case.d_model,
            d_ff=case.d_ff,
            num_layers=1,
            num_experts=case.num_experts,
            num_experts_per_tok=1,
            # Switch's capacity: expert_capacity slots per expert in every sequence
            expert_capacity=case.switch_capacity,
            capacity_scope="sequence",
        )
        # a standalone block gets no experts implementation from `post_init`; None would silently mean eager
        config._experts_implementation = implementation
        ours = SparseMoeBlock(config, T5MoeExperts(config))
        ours.router.weight.copy_(switch.router.classifier.weight)
        experts = [switch.experts[f"expert_{e}"] for e in range(case.num_experts)]
        ours.experts.up_proj.copy_(torch.stack([expert.wi.weight for expert in experts]))
        ours.experts.down_proj.copy_(torch.stack([expert.wo.weight for expert in experts]))
        layers[f"ours {implementation}"] = ours

    dense = T5DenseActDense(T5Config(d_model=case.d_model, d_ff=case.d_ff, dropout_rate=0.0))
    dense.load_state_dict(switch.experts["expert_0"].state_dict())
    layers["dense"] = dense
    return {name: layer.train() for name, layer in layers.items()}


def step(layer: nn.Module, x_BSD: torch.Tensor, grad_BSD: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x_BSD.grad = None
    layer(x_BSD).backward(grad_BSD)


def time_round_robin(
    layers: dict[str, nn.Module], x_BSD: torch.Tensor, grad_BSD: torch.Tensor, repeats: int
) -> dict[str, float]:
    for layer in layers.values():  # warm-up: allocator, kernels, lazy init
        step(layer, x_BSD, grad_BSD)
    samples: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(repeats):
        for name, layer in layers.items():
            # untimed first: a step right after another layer's ran 10-15% slower (caches, allocator), so whichever
            # variant followed Switch's per-expert loop looked slower (the D 64 rows, measured 2026-12-03)
            step(layer, x_BSD, grad_BSD)
            start = time.perf_counter()
            step(layer, x_BSD, grad_BSD)
            samples[name].append(time.perf_counter() - start)
    # the fastest sample, as `timeit` advises: background load only ever adds time, and shared CI boxes have plenty
    return {name: 1e3 * min(values) for name, values in samples.items()}


@torch.no_grad()
def dropped_share(layers: dict[str, nn.Module], x_BSD: torch.Tensor) -> tuple[float, float]:
    """Share of tokens dropped by capacity: (ours, switch) on the same input."""
    ours = layers[f"ours {AUTO_EXPERTS_IMPLEMENTATION}"]
    ours.reset_counters()
    ours(x_BSD)
    ours_share = (ours.dropped_tokens_per_expert.sum() / ours.routed_tokens_per_expert.sum()).item()
    dispatch_BSE, _, _ = layers["switch"].router(x_BSD)
    switch_share = 1.0 - dispatch_BSE.sum().item() / x_BSD.shape[0] / x_BSD.shape[1]
    return ours_share, switch_share


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", action="store_true", help="also run T5-base FFN shapes (minutes on 2 cores)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per layer (default: 20 small, 3 large)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's); 1 is steadier on a busy box",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    cases = [(case, args.repeats or 20) for case in small_cases()]
    if args.large:
        cases += [(case, args.repeats or 3) for case in large_cases()]

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}"
        f", {torch.get_num_threads()} threads; fp32 forward + backward, top-1, capacity factor 1.25, fastest of the steps in ms\n"
    )
    print(
        "| case | capacity / expert / seq | dropped ours / Switch | dense | Switch | ours hf_moe_auto | ours grouped_mm "
        "| ours eager "
        "| ours / Switch | ours / dense | Switch / dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case, repeats in cases:
        torch.manual_seed(0)
        layers = build_layers(case)
        x_BSD = torch.randn(case.batch, case.seq_len, case.d_model, requires_grad=True)
        grad_BSD = torch.randn_like(x_BSD)
        ms = time_round_robin(layers, x_BSD, grad_BSD, repeats)
        ours_dropped, switch_dropped = dropped_share(layers, x_BSD.detach())
        ours = ms[f"ours {AUTO_EXPERTS_IMPLEMENTATION}"]
        print(
            f"| {case.name} | {case.switch_capacity} | {ours_dropped:.1%} / {switch_dropped:.1%} | {ms['dense']:.2f} "
            f"| {ms['switch']:.2f} | {ours:.2f} | {ms['ours grouped_mm']:.2f} | {ms['ours eager']:.2f} "
            f"| {ours / ms['switch']:.2f}x "
            f"| {ours / ms['dense']:.2f}x | {ms['switch'] / ms['dense']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
