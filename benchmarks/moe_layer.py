"""Time one GPT-2 MoE layer (forward + backward, fp32, CPU) against a dense MLP and transformers' Switch layer.

Shape legend: B batch, S sequence, T = B*S tokens, D hidden size (d_model), F expert hidden size (d_ff),
E experts, K experts per token.

Every row of the table is one case: the same seeded input `x_BSD` and output gradient go through

- `dense`:  transformers' `GPT2MLP` with hidden size K*F, i.e. the same *active* FLOPs as the MoE layer
            (a top-2 MoE compares to a 2x-wide dense MLP);
- `ours`:   hf_moe's `SparseMoeBlock(config, GPT2MoeExperts(config))` (router, capacity, experts, counters),
            once per experts implementation (`hf_moe_auto`, the default and "ours" in the ratios; `grouped_mm`;
            `eager`; `batched_mm` at small shapes);
- `switch`: transformers' `SwitchTransformersSparseMLP` with the same D, F, E and router weights. It is top-1
            only, so top-2 rows compare against it at top-1 (it then does half of ours' expert FLOPs).

Run `python benchmarks/moe_layer.py --help`; `benchmarks/README.md` explains the cases and the numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import transformers
from bench_env import in_subprocess, peak_resident_mib, resident_mib, restart_peak_resident
from torch import nn
from transformers import GPT2Config, SwitchTransformersConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

from hf_moe import GPT2MoeConfig, SparseMoeBlock
from hf_moe.modeling import AUTO_EXPERTS_IMPLEMENTATION, EXPERTS_IMPLEMENTATIONS, GPT2MoeExperts

__all__ = ["Case", "default_cases", "main", "quick_cases", "run_case"]

ACTIVATION = "gelu_new"  # GPT-2's; Switch gets the same so the three layers differ only in how they route and group
INIT_STD = 0.02  # GPT-2's initializer_range, also the default router_init_std
MAX_SEQ_LEN = 1024  # GPT-2's context; Switch applies its capacity per sequence, so the (B, S) split matters to it
# Skew: the input gets a shared component `skew * u` along a fixed unit direction u (real residual streams have a
# large mean direction too) and router row 0 gets `+ skew * u`, so expert 0's logit rises by skew * (skew + N(0, 1))
# for every token. Zero-mean inputs could not be skewed through the router weight alone: w_0 . x would be as often
# negative as positive. 1.0 sends ~60% of first choices to expert 0 (the table reports the measured share).
DEFAULT_SKEW = 1.0


@dataclass(frozen=True)
class Case:
    """One row: shapes, routing and which of our experts implementations to time."""

    name: str
    regime: str  # "compute" (GPT-2-small FFN shapes) or "overhead" (small shapes, batch-1-decoding-like)
    tokens: int
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    skew: float = 0.0  # 0: balanced router; see DEFAULT_SKEW
    capacity_factor: float | None = None  # None: dropless
    # the first is "ours" in the ratios
    experts_implementations: tuple[str, ...] = (AUTO_EXPERTS_IMPLEMENTATION, "grouped_mm", "eager")
    # registry name; for routers other than top-k, `top_k` is the experts a token uses (expert choice: its
    # capacity factor), which sets the dense comparator's width k*F
    router_type: str = "topk"


def _large(name: str, **fields) -> Case:
    return Case(name=name, regime="compute", tokens=8192, d_model=768, d_ff=3072, **fields)


def _small(name: str, **fields) -> Case:
    fields.setdefault("experts_implementations", EXPERTS_IMPLEMENTATIONS)
    return Case(name=name, regime="overhead", tokens=256, d_model=64, d_ff=256, **fields)


def quick_cases() -> list[Case]:
    """The overhead-bound regime (256 tokens, D=64): every code path of the full run, in seconds."""
    return [
        _small("small E8 k1", num_experts=8, top_k=1),
        _small("small E8 k2", num_experts=8, top_k=2),
        _small("small E32 k1", num_experts=32, top_k=1),
        _small("small E32 k2", num_experts=32, top_k=2),
        _small("small E8 k2 skewed", num_experts=8, top_k=2, skew=DEFAULT_SKEW),
        _small("small E8 k2 cap1.25", num_experts=8, top_k=2, capacity_factor=1.25),
        *router_cases(_small, "small E8"),
    ]


def router_cases(make: Callable[..., Case], prefix: str) -> list[Case]:
    """One row per router from the literature, at E=8 (the default implementation only; the router is what differs)."""
    fields = dict(num_experts=8, experts_implementations=(AUTO_EXPERTS_IMPLEMENTATION,))
    return [
        make(f"{prefix} hash", top_k=1, router_type="hash", **fields),
        make(f"{prefix} BASE", top_k=1, router_type="base", **fields),
        make(f"{prefix} dense-to-sparse k2", top_k=2, router_type="dense_to_sparse", **fields),
        make(f"{prefix} expert choice c2", top_k=2, router_type="expert_choice", capacity_factor=2.0, **fields),
    ]


GROUPED = (AUTO_EXPERTS_IMPLEMENTATION, "grouped_mm")  # the large rows where eager's loop would take minutes


def default_cases() -> list[Case]:
    """The quick cases, then GPT-2-small FFN shapes (8192 tokens, D=768, F=3072), where the work is compute-bound.

    `batched_mm` is left out at large shapes: it gathers one (D, F) weight per (token, expert) slot, i.e.
    T*K*D*F*4 bytes = 77 GiB per projection at top-1 (154 GiB at top-2). `eager` at E=64 loops over 64 experts
    in Python and costs many dense steps, so it runs on the top-1 row only.
    """
    return quick_cases() + [
        _large("E8 k1", num_experts=8, top_k=1),
        _large("E8 k2", num_experts=8, top_k=2),
        _large("E64 k1", num_experts=64, top_k=1),
        _large("E64 k2", num_experts=64, top_k=2, experts_implementations=GROUPED),
        _large("E8 k2 skewed", num_experts=8, top_k=2, skew=DEFAULT_SKEW, experts_implementations=GROUPED),
        _large("E8 k2 cap1.25", num_experts=8, top_k=2, capacity_factor=1.25),
        _large(
            "E8 k2 skewed cap1.25",
            num_experts=8,
            top_k=2,
            skew=DEFAULT_SKEW,
            capacity_factor=1.25,
            experts_implementations=GROUPED,
        ),
        *router_cases(_large, "E8"),
    ]


@dataclass
class Timing:
    label: str
    samples_s: list[float] = field(default_factory=list)
    inner: int = 1  # steps per sample
    peak_mib: float | None = None

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.samples_s)


# ---------------------------------------------------------------------------------------------- building the layers


VOCAB_SIZE = 50257  # GPT-2's: the hash router's table has one row per token id


def _gpt2_moe_config(case: Case) -> GPT2MoeConfig:
    return GPT2MoeConfig(
        vocab_size=VOCAB_SIZE,
        router_type=case.router_type,
        # expert choice picks tokens across the batch; the layer benchmark has no causality to protect
        allow_noncausal_routing=case.router_type == "expert_choice",
        n_embd=case.d_model,
        n_head=max(1, case.d_model // 64),
        n_inner=case.d_ff,
        n_layer=1,
        activation_function=ACTIVATION,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        num_experts=case.num_experts,
        num_experts_per_tok=case.top_k,
        capacity_factor=case.capacity_factor,
        eval_capacity_factor=case.capacity_factor,
    )


@torch.no_grad()
def build_ours(case: Case, hot_direction_D: torch.Tensor) -> SparseMoeBlock:
    config = _gpt2_moe_config(case)
    # standalone modules get no experts implementation from `post_init`; None would silently mean eager
    config._experts_implementation = AUTO_EXPERTS_IMPLEMENTATION
    block = SparseMoeBlock(config, GPT2MoeExperts(config))
    experts = block.experts
    experts.up_proj.normal_(0.0, INIT_STD)
    experts.down_proj.normal_(0.0, INIT_STD)
    experts.up_proj_bias.zero_()
    experts.down_proj_bias.zero_()
    if hasattr(block.router, "weight"):  # the hash router has no parameters
        block.router.weight.normal_(0.0, INIT_STD)
        block.router.weight[0] += case.skew * hot_direction_D
    return block.train()


def build_dense(case: Case) -> GPT2MLP:
    config = GPT2Config(n_embd=case.d_model, n_head=max(1, case.d_model // 64), activation_function=ACTIVATION)
    config.resid_pdrop = 0.0
    mlp = GPT2MLP(case.top_k * case.d_ff, config)  # same active FLOPs as K experts of width F
    with torch.no_grad():
        for conv in (mlp.c_fc, mlp.c_proj):
            conv.weight.normal_(0.0, INIT_STD)
            conv.bias.zero_()
    return mlp.train()


def switch_capacity(case: Case, seq_len: int) -> int:
    """Switch counts capacity per sequence (its router cumsums over S); without a factor, S drops nothing."""
    if case.capacity_factor is None:
        return seq_len
    return max(1, math.ceil(case.capacity_factor * seq_len / case.num_experts))


@torch.no_grad()
def build_switch(case: Case, ours: SparseMoeBlock, seq_len: int) -> SwitchTransformersSparseMLP:
    config = SwitchTransformersConfig(
        d_model=case.d_model,
        d_ff=case.d_ff,
        num_experts=case.num_experts,
        expert_capacity=switch_capacity(case, seq_len),
        dense_act_fn=ACTIVATION,
        dropout_rate=0.0,
        router_jitter_noise=0.0,
        router_bias=False,
        router_dtype="float32",
    )
    switch = SwitchTransformersSparseMLP(config)
    # the same router and expert weights as ours: identical routing, and at top-1 the identical function (the hash
    # router has no weights: Switch keeps its random router there, a reference for the cost of learned routing)
    if hasattr(ours.router, "weight"):
        switch.router.classifier.weight.copy_(ours.router.weight)
    for index in range(case.num_experts):
        expert = switch.experts[f"expert_{index}"]
        expert.wi.weight.copy_(ours.experts.up_proj[index].t())  # ours is GPT-2's Conv1D layout (D, F)
        expert.wo.weight.copy_(ours.experts.down_proj[index].t())
    return switch.train()


def make_inputs(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded input (B, S, D), output gradient (B, S, D), the unit direction the skew uses, token ids (B, S)."""
    torch.manual_seed(seed)
    seq_len = min(case.tokens, MAX_SEQ_LEN)
    if case.tokens % seq_len:
        raise ValueError(f"tokens must be a multiple of {seq_len}, got {case.tokens}")
    shape = (case.tokens // seq_len, seq_len, case.d_model)
    hot_direction_D = torch.randn(case.d_model)
    hot_direction_D /= hot_direction_D.norm()
    x_BSD = torch.randn(shape) + case.skew * hot_direction_D
    grad_BSD = torch.randn(shape)
    input_ids_BS = torch.randint(0, VOCAB_SIZE, shape[:2])
    return x_BSD.requires_grad_(), grad_BSD, hot_direction_D, input_ids_BS


# ----------------------------------------------------------------------------------------------------------- timing


@dataclass
class Variant:
    label: str
    module: nn.Module
    experts_implementation: str | None = None  # ours only: selected before every sample (variants share a block)

    def select(self) -> None:
        if self.experts_implementation is not None:
            self.module.experts.config._experts_implementation = self.experts_implementation


def make_step(
    module: nn.Module, x_BSD: torch.Tensor, grad_BSD: torch.Tensor, **forward_kwargs
) -> Callable[[], torch.Tensor]:
    """One training step of the layer alone: fresh gradients (set to None, as `zero_grad` does), forward, backward."""
    params = list(module.parameters())

    def step() -> torch.Tensor:
        for param in params:
            param.grad = None
        x_BSD.grad = None
        out_BSD = module(x_BSD, **forward_kwargs)
        out_BSD.backward(grad_BSD)
        return out_BSD.detach()

    return step


BUSY_WARNING = 0.05  # share of CPU time used by other processes above which a row is flagged


class CpuLoadMeter:
    """How much of the machine's CPU time *other* processes used since construction (Linux; None elsewhere).

    On 2 cores, another process running makes OpenMP threads wait for a descheduled partner: a 1 ms step can take
    hundreds of ms. Medians absorb short spells only, so rows measured on a busy machine are flagged.
    """

    def __init__(self):
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as file:
                fields = [float(value) for value in file.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        busy_s = (sum(fields[:8]) - idle) / ticks  # user..steal, without guest time (already counted in user)
        total_s = sum(fields[:8]) / ticks
        own = os.times()
        return busy_s - (own.user + own.system), total_s

    def others_busy_fraction(self) -> float | None:
        end = self._read()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return None
        return max(0.0, (end[0] - self._start[0]) / (end[1] - self._start[1]))


def wait_for_idle_cpus(max_wait_s: float, log: Callable[[str], None]) -> None:
    """Poll in 2 s windows until other processes use under BUSY_WARNING of the CPUs, for at most `max_wait_s`."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        meter = CpuLoadMeter()
        time.sleep(2.0)
        busy = meter.others_busy_fraction()
        if busy is None or busy <= BUSY_WARNING:
            return
        log(f"  waiting: other processes use {busy:.0%} of the CPUs")
    log(f"  still busy after {max_wait_s:.0f} s; measuring anyway")


def time_sample(step: Callable[[], torch.Tensor], inner: int) -> float:
    """Seconds per step over `inner` back-to-back steps, garbage collector off (as `timeit` does)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(inner):
            step()
        return (time.perf_counter() - start) / inner
    finally:
        if gc_was_enabled:
            gc.enable()


def peak_step_memory_mib(case: Case, label: str, seed: int) -> float:
    """Peak resident memory of one step of variant `label` of `case`, above the memory held when the step started
    (gradients included), measured in a fresh subprocess (`--worker`) so no other variant's memory counts.

    The worker builds only that variant and its inputs, reads its resident set size, runs one step and reads the
    peak resident set size of that step (`bench_env.peak_resident_mib`); the difference is the step's peak. It
    includes what MKL / oneDNN and the allocator hold for themselves, which a tensor count would miss. (torch's
    memory profiler ran out of 24 GiB at E=64: it records every allocation.)
    """
    return in_subprocess(__file__, {"case": asdict(case), "label": label, "seed": seed})["peak_mib"]


def _memory_worker(request: dict) -> float:
    case = Case(**{**request["case"], "experts_implementations": tuple(request["case"]["experts_implementations"])})
    label = request["label"]
    x_BSD, grad_BSD, hot_direction_D, input_ids_BS = make_inputs(case, request["seed"])
    kwargs = {}
    if label == "dense":
        module = build_dense(case)
    else:
        ours = build_ours(case, hot_direction_D)
        if label == "switch":
            module = build_switch(case, ours, x_BSD.shape[1])
            del ours
        else:
            module = ours
            Variant(label, ours, label.removeprefix("ours[").removesuffix("]")).select()
            kwargs = {"input_ids": input_ids_BS}
    step = make_step(module, x_BSD, grad_BSD, **kwargs)
    gc.collect()
    start_mib = resident_mib()
    restart_peak_resident()
    step()
    return peak_resident_mib() - start_mib


def run_case(
    case: Case,
    *,
    seed: int = 0,
    repeats: int = 5,
    warmup: int = 1,
    min_sample_s: float = 0.0,
    memory: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Time every variant of one case on the same input; returns one result row (see README for the fields)."""
    case_start = time.perf_counter()
    x_BSD, grad_BSD, hot_direction_D, input_ids_BS = make_inputs(case, seed)
    seq_len = x_BSD.shape[1]
    ours = build_ours(case, hot_direction_D)
    variants = [Variant("dense", build_dense(case))]
    variants += [Variant(f"ours[{impl}]", ours, impl) for impl in case.experts_implementations]
    variants.append(Variant("switch", build_switch(case, ours, seq_len)))
    # our block also gets the token ids (the hash router routes by them; the others ignore them)
    steps = {
        variant.label: make_step(
            variant.module, x_BSD, grad_BSD, **({"input_ids": input_ids_BS} if variant.module is ours else {})
        )
        for variant in variants
    }
    timings = {variant.label: Timing(variant.label) for variant in variants}

    outputs = {}
    load = CpuLoadMeter()
    for variant in variants:
        variant.select()
        fastest = math.inf
        for _ in range(max(1, warmup)):
            start = time.perf_counter()
            outputs[variant.label] = steps[variant.label]()
            fastest = min(fastest, time.perf_counter() - start)
        # small shapes: several steps per sample so one sample is long against the timer and the OS scheduler
        timings[variant.label].inner = max(1, math.ceil(min_sample_s / max(fastest, 1e-6)))

    # Interleaved: each repeat times every variant once, in a rotated order, so a slow spell of the (shared,
    # 2-core) machine lands on all variants alike instead of on whichever ran then.
    for repeat in range(repeats):
        shift = repeat % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            variant.select()
            timing = timings[variant.label]
            timing.samples_s.append(time_sample(steps[variant.label], timing.inner))

    others_busy = load.others_busy_fraction()

    if memory:
        for variant in variants:
            timings[variant.label].peak_mib = peak_step_memory_mib(case, variant.label, seed)

    row = _summarize(case, ours, timings, outputs, seq_len)
    row["others_busy_fraction"] = others_busy
    row["case_seconds"] = time.perf_counter() - case_start
    if others_busy is not None and others_busy > BUSY_WARNING:
        log(f"  WARNING: other processes used {others_busy:.0%} of the CPUs while {case.name!r} ran; rerun it quiet")
    row["switch_dropped_fraction"] = _switch_dropped_fraction(variants[-1].module, x_BSD)
    log(f"  {case.name}: " + ", ".join(f"{label} {t.median_ms:.2f} ms" for label, t in timings.items()))
    return row


@torch.no_grad()
def _switch_dropped_fraction(switch: SwitchTransformersSparseMLP, x_BSD: torch.Tensor) -> float:
    dispatch_BSE, _, _ = switch.router(x_BSD)
    return 1.0 - dispatch_BSE.sum().item() / (x_BSD.shape[0] * x_BSD.shape[1])


def _summarize(case: Case, ours: SparseMoeBlock, timings: dict, outputs: dict, seq_len: int) -> dict:
    routed_E = ours.routed_tokens_per_expert
    ours_label = f"ours[{case.experts_implementations[0]}]"
    ms = {label: timing.median_ms for label, timing in timings.items()}
    # sanity checks on the warmup outputs: our kernels agree; at top-1 dropless, Switch computes the same function
    reference = outputs[ours_label]
    max_abs_diff = {
        label: (out - reference).abs().max().item()
        for label, out in outputs.items()
        if label.startswith("ours[") and label != ours_label
    }
    if case.top_k == 1 and case.capacity_factor is None and case.router_type == "topk":
        max_abs_diff["switch"] = (outputs["switch"] - reference).abs().max().item()
    row = {
        "case": asdict(case),
        "batch": case.tokens // seq_len,
        "seq_len": seq_len,
        "ms": ms,
        "samples_ms": {label: [1e3 * s for s in t.samples_s] for label, t in timings.items()},
        "steps_per_sample": {label: t.inner for label, t in timings.items()},
        "peak_mib": {label: t.peak_mib for label, t in timings.items()},
        "ours_label": ours_label,
        "ours_over_dense": ms[ours_label] / ms["dense"],
        "switch_over_ours": ms["switch"] / ms[ours_label],
        "top_expert_share": (routed_E.max() / routed_E.sum()).item(),
        "ours_dropped_fraction": (ours.dropped_tokens_per_expert.sum() / routed_E.sum()).item(),
        "max_abs_diff_vs_ours": max_abs_diff,
    }
    return row


# ----------------------------------------------------------------------------------------------------------- output


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _fmt_pct(value: float) -> str:
    return f"{100 * value:.0f}%" if value >= 0.01 or value == 0 else f"{100 * value:.1f}%"


def markdown_tables(rows: Sequence[dict]) -> str:
    """The timing table (median ms per forward+backward, ratios) and, when measured, the peak-memory table."""
    impls = [impl for impl in EXPERTS_IMPLEMENTATIONS if any(f"ours[{impl}]" in row["ms"] for row in rows)]
    header = ["case", "T", "D", "F", "E", "k", "dense (k·F wide)"]
    header += [f"ours {impl}" for impl in impls]
    header += ["Switch (top-1)", "**ours / dense**", "**Switch / ours**"]
    header += [f"{impl} / dense" for impl in impls if impl != AUTO_EXPERTS_IMPLEMENTATION]
    header += ["top expert", "dropped ours / Switch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        case, ms = row["case"], row["ms"]
        name = case["name"]
        busy = row.get("others_busy_fraction")
        if busy is not None and busy > BUSY_WARNING:
            name += f" (machine {busy:.0%} busy)"
        cells = [name, case["tokens"], case["d_model"], case["d_ff"], case["num_experts"], case["top_k"]]
        cells.append(_fmt_ms(ms["dense"]))
        cells += [_fmt_ms(ms.get(f"ours[{impl}]")) for impl in impls]
        cells.append(_fmt_ms(ms["switch"]))
        cells += [f"**{row['ours_over_dense']:.2f}x**", f"**{row['switch_over_ours']:.2f}x**"]
        for impl in impls:
            if impl != AUTO_EXPERTS_IMPLEMENTATION:
                value = ms.get(f"ours[{impl}]")
                cells.append("-" if value is None else f"{value / ms['dense']:.2f}x")
        cells.append(_fmt_pct(row["top_expert_share"]))
        if case["capacity_factor"] is None:
            cells.append("dropless")
        else:
            cells.append(f"{_fmt_pct(row['ours_dropped_fraction'])} / {_fmt_pct(row['switch_dropped_fraction'])}")
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    text = "\n".join(lines)

    measured = [row for row in rows if row["peak_mib"].get("dense") is not None]
    if measured:
        header = ["case", "dense"] + [f"ours {impl}" for impl in impls] + ["Switch (top-1)", "ours / dense"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in measured:
            peak = row["peak_mib"]
            cells = [row["case"]["name"], f"{peak['dense']:.0f}"]
            cells += ["-" if peak.get(f"ours[{impl}]") is None else f"{peak[f'ours[{impl}]']:.0f}" for impl in impls]
            cells.append(f"{peak['switch']:.0f}")
            cells.append(f"{peak[row['ours_label']] / peak['dense']:.2f}x")
            lines.append("| " + " | ".join(cells) + " |")
        text += (
            "\n\nPeak resident memory of one forward+backward step (MiB, above the step's start; one subprocess per "
        )
        text += "variant):\n\n"
        text += "\n".join(lines)
    return text


def environment(malloc: str) -> dict:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "malloc": malloc,
    }


def write_json_atomically(path: str, payload: dict) -> None:
    """Write to a temporary file next to `path`, then rename: an interrupted run leaves no half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=directory, prefix=".moe_layer-", suffix=".json")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(payload, file, indent=2)
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def keep_freed_memory_in_process() -> bool:
    """Stop glibc from handing large freed blocks back to the OS (`mallopt`; Linux/glibc only).

    By default glibc serves every block over 32 MiB with its own mmap and unmaps it on free, so each step of a
    large layer page-faults its activations in afresh: on the 2-core reference machine a dense step took 4.7-10.9 s
    that way (a third of it kernel time) against 2.8-3.3 s with this. Same effect as the environment variables
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1, or as preloading jemalloc/tcmalloc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    # trim threshold -1 disables trimming (mallopt(3)); mallopt returns 1 on success
    return libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, -1) == 1


# ------------------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Forward+backward time (fp32, CPU) of hf_moe's GPT-2 MoE block against a dense GPT-2 MLP of equal "
            "active FLOPs and transformers' SwitchTransformersSparseMLP, on the same input. Prints a markdown "
            "table of median milliseconds and ratios."
        )
    )
    parser.add_argument("--quick", action="store_true", help="small shapes only (256 tokens, D=64): seconds")
    parser.add_argument("--cases", default=None, help="only cases whose name contains this text, e.g. 'E64'")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed samples per variant (default: 7 small shapes, 3 large, 5 --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps per variant (default: 3 small shapes, 1 large, 2 --quick)",
    )
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for inputs and weights of every case")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--wait-for-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each case, wait up to this long for other processes to leave the CPUs (shared machines)",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory pass (one subprocess per variant and case)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--malloc",
        choices=("keep", "system"),
        default="keep",
        help="'keep' (default): glibc keeps freed memory for reuse, removing page-fault noise; "
        "'system': leave the process's allocator as it is",
    )
    parser.add_argument("--json", metavar="PATH", default=None, help="also save environment and rows as JSON here")
    args = parser.parse_args(argv)
    for name in ("repeats", "warmup", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be >= {0 if name == 'warmup' else 1}, got {value}")
    return args


# per regime: (repeats, warmup, minimum seconds per sample). Small steps take ~1 ms, so a sample is tens of steps;
# a large step takes seconds and a full run must stay well under 10 minutes on 2 cores, hence 3 samples.
REGIME_DEFAULTS = {"overhead": (7, 3, 0.05), "compute": (3, 1, 0.0)}
QUICK_DEFAULTS = (5, 2, 0.02)  # --quick: the same cases, shorter samples (under 30 s in all)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark; prints the table and returns the result rows (one dict per case)."""
    args = parse_args(argv)
    if args.worker:  # one variant's peak memory, for `peak_step_memory_mib`
        print(json.dumps({"peak_mib": _memory_worker(json.loads(args.worker))}))
        return []
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    malloc = "system"
    if args.malloc == "keep":
        malloc = "keep (mallopt)" if keep_freed_memory_in_process() else "system (mallopt unavailable)"
    cases = quick_cases() if args.quick else default_cases()
    if args.cases is not None:
        cases = [case for case in cases if args.cases in case.name]
        if not cases:
            raise SystemExit(f"no case name contains {args.cases!r}")
    env = environment(malloc)
    print(
        f"# MoE layer fwd+bwd, fp32 CPU: torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['torch_threads']} threads, malloc {malloc}",
        flush=True,
    )
    rows = []
    for case in cases:
        if args.wait_for_idle > 0:
            wait_for_idle_cpus(args.wait_for_idle, log=lambda line: print(line, flush=True))
        repeats, warmup, min_sample_s = QUICK_DEFAULTS if args.quick else REGIME_DEFAULTS[case.regime]
        row = run_case(
            case,
            seed=args.seed,
            repeats=args.repeats if args.repeats is not None else repeats,
            warmup=args.warmup if args.warmup is not None else warmup,
            min_sample_s=min_sample_s,
            memory=not args.no_memory,
            log=lambda line: print(line, flush=True),
        )
        rows.append(row)
        gc.collect()
    print()
    print(markdown_tables(rows))
    if args.json is not None:
        write_json_atomically(args.json, {"environment": env, "rows": rows})
        print(f"\nsaved {args.json}")
    return rows


if __name__ == "__main__":
    main()
