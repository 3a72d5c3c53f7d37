"""Whole-model decoding speed: `generate` tokens/s at batch 1 and batch 8, and the prefill time, of a GPT-2 MoE under
each experts implementation against a dense GPT-2 and a dense GPT-2 of equal active FLOPs.

Shape legend: D hidden size, F expert hidden size, E experts, K experts per token.

Variants (every one a GPT-2 with the same D, layers, heads and vocabulary, random weights from one seed):

- `dense`:          GPT-2 with FFN width F (the model the MoE is made from);
- `dense K*F`:      GPT-2 with FFN width K*F: the same active FLOPs per token as the MoE (the fair comparison);
- `moe <impl>`:     GPT-2 MoE, E experts of width F, top-K in every layer, with `set_experts_implementation(impl)`.

Each measurement runs in a fresh subprocess (one model per process, so no model's memory or caches help another),
round-robin over the variants, `--repeats` times; the table reports medians and the ratio of each variant's decode
tokens/s to `dense K*F`'s, measured side by side in the same run. Greedy decoding with the KV cache, `--new-tokens`
tokens after a `--prompt-tokens` prompt:

    prefill   = from the call of `generate` to the first token's logits (one forward over the prompt)
    decode/s  = batch * (new_tokens - 1) / (time from the first token's logits to the last one's)

both timed by a logits processor, which `generate` calls right after each step's forward, as medians of `CALLS`
calls after a warm-up call.

    python benchmarks/generate.py                    # the README's table (GPT-2-small-shaped, 2 layers)
    python benchmarks/generate.py --quick            # seconds: tiny shapes, every code path
    python benchmarks/generate.py --device cuda      # the same on a GPU
    python benchmarks/generate.py --compile          # static KV cache + torch.compile (each worker compiles first)
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
    round_robin,
    run_worker,
    settings_from,
    synchronize,
    whole_model_parser,
)

from hf_moe.modeling import EXPERTS_IMPLEMENTATIONS

__all__ = ["Settings", "main", "measure"]

IMPLEMENTATIONS = EXPERTS_IMPLEMENTATIONS  # hf_moe_auto (the default), grouped_mm, eager, batched_mm
CALLS = 3  # timed generate calls per batch size in one worker


@dataclass
class Settings(WholeModelSettings):
    prompt_tokens: int = 32
    new_tokens: int = 64
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    implementations: list[str] = field(default_factory=lambda: list(IMPLEMENTATIONS))
    repeats: int = 5
    # a static KV cache and `torch.compile(model.forward, fullgraph=True)` (transformers' recipe for fast decoding);
    # the warm-up call of each batch size compiles, so the timed calls run the compiled graphs
    compile: bool = False


QUICK = dict(n_layer=2, n_embd=64, n_head=4, ffn=128, num_experts=4, vocab_size=512, prompt_tokens=8, new_tokens=6,
             repeats=1)  # fmt: skip


def build(variant: str, settings: Settings):
    """The variant's model, in eval mode on the settings' device, seeded."""
    import torch

    shape = dict(
        n_layer=settings.n_layer, n_embd=settings.n_embd, n_head=settings.n_head, vocab_size=settings.vocab_size,
        n_positions=settings.prompt_tokens + settings.new_tokens, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = build_gpt2_variant(variant, settings, **shape).eval()
    # no end-of-sequence token: every variant decodes all its tokens, whatever its random weights predict (not
    # `min_new_tokens`, whose processor scans the vocabulary at every step and would dominate small models' time)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if settings.compile:
        model.generation_config.cache_implementation = "static"
        # CUDA graphs ("reduce-overhead") on a GPU; on CPU the default mode
        mode = "reduce-overhead" if settings.device.startswith("cuda") else None
        model.forward = torch.compile(model.forward, fullgraph=True, mode=mode)
    return model


def measure(variant: str, settings: Settings) -> dict:
    """One worker's measurement of one variant: prefill seconds and decode tokens/s per batch size (medians over
    `CALLS` generate calls after a warm-up call)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        # called once per generated token, right after that step's forward: the gaps are the decode steps
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            synchronize(settings.device)
            self.times.append(time.perf_counter())
            return scores

    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = build(variant, settings)
    result = {}
    for batch in settings.batch_sizes:
        prompt = torch.randint(1, settings.vocab_size, (batch, settings.prompt_tokens), device=settings.device)
        prefills, decodes = [], []
        for call in range(CALLS + 1):  # call 0 warms up the allocator, kernels and generation config
            clock = Clock()
            synchronize(settings.device)
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=settings.new_tokens,
                    do_sample=False, logits_processor=LogitsProcessorList([clock]),
                )  # fmt: skip
            if call:
                prefills.append(clock.times[0] - start)
                decodes.append(batch * (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
        result[str(batch)] = {
            "prefill_s": statistics.median(prefills),
            "decode_tokens_per_s": statistics.median(decodes),
        }
    return result


def run(settings: Settings, log=print) -> dict:
    """Round-robin over the variants, one subprocess per measurement; medians and ratios to `dense K*F`."""
    samples = round_robin(__file__, settings, log)
    names = list(samples)
    rows = []
    for batch in map(str, settings.batch_sizes):
        reference = statistics.median(s[batch]["decode_tokens_per_s"] for s in samples["dense K*F"])
        for name in names:
            decode = statistics.median(s[batch]["decode_tokens_per_s"] for s in samples[name])
            prefill = statistics.median(s[batch]["prefill_s"] for s in samples[name])
            rows.append(
                {"variant": name, "batch": int(batch), "decode_tokens_per_s": decode, "prefill_ms": 1000 * prefill,
                 "vs_dense_equal_active": decode / reference}
            )  # fmt: skip
    return {"settings": asdict(settings), "environment": environment(), "rows": rows, "samples": samples}


def table(result: dict) -> str:
    header = ["variant", "batch", "decode tokens/s", "vs dense K*F", "prefill ms"]
    return markdown_table(
        header,
        [
            [row["variant"], str(row["batch"]), f"{row['decode_tokens_per_s']:.1f}",
             f"{row['vs_dense_equal_active']:.2f}x", f"{row['prefill_ms']:.1f}"]
            for row in result["rows"]
        ],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict | None:
    parser = whole_model_parser(__doc__.split("\n\n")[0], "outputs/generate.json", 5, str(list(IMPLEMENTATIONS)))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8")
    parser.add_argument(
        "--compile", action="store_true", help="static KV cache + torch.compile(model.forward, fullgraph=True)"
    )
    args = parser.parse_args(argv)
    if run_worker(args, measure, Settings):
        return None
    settings = settings_from(args, parser, Settings, QUICK, compile=args.compile)
    if args.batch_sizes is not None:
        settings.batch_sizes = args.batch_sizes
    result = run(settings)
    return finish(result, table(result), args.json)


if __name__ == "__main__":
    main()
