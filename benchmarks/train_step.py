"""Whole-model training speed and memory: tokens/s and peak memory of a training step (forward, backward, AdamW) of a
GPT-2 MoE under each experts implementation against a dense GPT-2 and a dense GPT-2 of equal active FLOPs.

Shape legend: D hidden size, F expert hidden size, E experts, K experts per token.

Variants (every one a GPT-2 with the same D, layers, heads and vocabulary, random weights from one seed):

- `dense`:          GPT-2 with FFN width F (the model the MoE is made from);
- `dense K*F`:      GPT-2 with FFN width K*F: the same active FLOPs per token as the MoE (the fair comparison);
- `moe <impl>`:     GPT-2 MoE, E experts of width F, top-K in every layer, with `set_experts_implementation(impl)`,
                    the router losses in the loss as in training (`labels=`).

Each measurement runs in a fresh subprocess (one model per process, so one model's memory does not hide another's),
round-robin over the variants, `--repeats` times; medians, and each variant's tokens/s over `dense K*F`'s measured in
the same run. A worker builds its model and an AdamW optimizer, runs one warm-up step (which also allocates the
optimizer state), then times `STEPS` steps on seeded random token batches:

    tokens/s  = batch * sequence / median step time
    peak MiB  = CPU: the worker's peak resident memory during the steps (Linux's VmHWM: model, gradients, AdamW
                state, activations, allocator slack, the interpreter); CUDA: torch.cuda.max_memory_allocated

`batched_mm` is left out by default: it gathers one (D, F) expert weight per (token, expert) slot, 19 GiB per
projection at the default shapes.

    python benchmarks/train_step.py                  # the README's table (GPT-2-small-shaped, 2 layers, 8 x 128)
    python benchmarks/train_step.py --quick          # seconds: tiny shapes, every code path
    python benchmarks/train_step.py --device cuda    # the same on a GPU
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

from bench_env import (
    WholeModelSettings,
    build_gpt2_variant,
    environment,
    finish,
    markdown_table,
    peak_resident_mib,
    restart_peak_resident,
    round_robin,
    run_worker,
    settings_from,
    synchronize,
    whole_model_parser,
)

from hf_moe.modeling import EXPERTS_IMPLEMENTATIONS

__all__ = ["Settings", "main", "measure"]

STEPS = 5  # timed steps per worker, after one warm-up step


@dataclass
class Settings(WholeModelSettings):
    batch: int = 8
    sequence: int = 128
    implementations: list[str] = field(
        default_factory=lambda: [name for name in EXPERTS_IMPLEMENTATIONS if name != "batched_mm"]
    )
    repeats: int = 3


QUICK = dict(n_layer=2, n_embd=64, n_head=4, ffn=128, num_experts=4, vocab_size=512, batch=2, sequence=16, repeats=1)


def build(variant: str, settings: Settings):
    """The variant's model, in training mode on the settings' device, seeded."""
    shape = dict(
        n_layer=settings.n_layer, n_embd=settings.n_embd, n_head=settings.n_head, vocab_size=settings.vocab_size,
        n_positions=settings.sequence, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return build_gpt2_variant(variant, settings, **shape).train()


def measure(variant: str, settings: Settings) -> dict:
    """One worker's measurement of one variant: median step seconds and peak memory."""
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = build(variant, settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, settings.vocab_size, (settings.batch, settings.sequence), generator=generator).to(
            settings.device
        )
        for _ in range(STEPS + 1)
    ]
    if settings.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        restart_peak_resident()
    times = []
    for input_ids in batches:
        synchronize(settings.device)
        start = time.perf_counter()
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(settings.device)
        times.append(time.perf_counter() - start)
    if settings.device.startswith("cuda"):
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = peak_resident_mib()
    return {"step_s": statistics.median(times[1:]), "peak_mib": peak_mib}


def run(settings: Settings, log=print) -> dict:
    """Round-robin over the variants, one subprocess per measurement; medians and ratios to `dense K*F`."""
    samples = round_robin(__file__, settings, log)
    names = list(samples)
    tokens = settings.batch * settings.sequence
    medians = {
        name: {key: statistics.median(sample[key] for sample in samples[name]) for key in ("step_s", "peak_mib")}
        for name in names
    }
    reference = medians["dense K*F"]
    rows = [
        {
            "variant": name,
            "tokens_per_s": tokens / median["step_s"],
            "step_ms": 1000 * median["step_s"],
            "peak_mib": median["peak_mib"],
            "vs_dense_equal_active": reference["step_s"] / median["step_s"],
            "memory_vs_dense_equal_active": median["peak_mib"] / reference["peak_mib"],
        }
        for name, median in medians.items()
    ]
    return {"settings": asdict(settings), "environment": environment(), "rows": rows, "samples": samples}


def table(result: dict) -> str:
    header = ["variant", "tokens/s", "vs dense K*F", "step ms", "peak MiB", "memory vs dense K*F"]
    return markdown_table(
        header,
        [
            [row["variant"], f"{row['tokens_per_s']:.0f}", f"{row['vs_dense_equal_active']:.2f}x",
             f"{row['step_ms']:.0f}", f"{row['peak_mib']:.0f}", f"{row['memory_vs_dense_equal_active']:.2f}x"]
            for row in result["rows"]
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict | None:
    parser = whole_model_parser(__doc__.split("\n\n")[0], "outputs/train_step.json", 3, "all but batched_mm")
    args = parser.parse_args(argv)
    if run_worker(args, measure, Settings):
        return None
    settings = settings_from(args, parser, Settings, QUICK)
    result = run(settings)
    return finish(result, table(result), args.json)


if __name__ == "__main__":
    main()
