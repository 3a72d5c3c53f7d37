"""Does upcycling beat continued dense training? Held-out LM loss of each upcycling recipe against the dense model,
over seeds, at the same number of steps and at the same wall time.

1. Pre-train a small dense GPT-2 on local text (default: the Python standard library's source, with a byte-level BPE
   trained on it; `--text-files` for your own), once, with seed 0.
2. For every seed: continue the dense model for `--steps` steps, and upcycle it with each recipe (`moefy`) and train
   that for the same steps, on the same batches in the same order (the seed sets the order and the recipe's random
   choices). One AdamW run per model; the held-out LM loss (router losses excluded) is measured every `--eval-every`
   steps, and once more the moment the run's training time reaches the dense run's total: that is the
   same-wall-time point (evaluation time is not counted as training time).
3. Print a table (mean ± std over seeds, difference to dense, paired by seed) and save the rows as JSON and a plot of
   held-out loss over steps (mean over seeds).

Recipes (`RECIPES`, moefy arguments): copy, noise, drop_upcycle r=0.5, granular, kmeans router, scaled weights; and,
with `--recipes`, WideNet's shared block started as the mean of the dense blocks, block 0 or the last block.
Shapes: dense GPT-2 with 4 layers, d 128, F 512; MoE with 8 experts top-2 in every layer (granular: G=2 shards of
F/2, top-4, i.e. the same active FLOPs as copy top-2).

`--family t5`: the same with a small dense T5 (2 + 2 layers, d 128, F 512) on text pairs (`--text-pairs FILE`, one
"source<TAB>target" per line), or, without pairs, on T5's span corruption of the same text (15% of the tokens in
spans of mean length 3 replaced by sentinels; the target lists the spans; a fixed seeded corruption per block).

Wall time on a shared 2-core CPU drifts by tens of percent, so the same-wall-time column is the noisier one.

    python benchmarks/upcycling_quality.py                       # the README's table (about 15 minutes on 2 cores)
    python benchmarks/upcycling_quality.py --family t5           # the T5 version (about 8 minutes)
    python benchmarks/upcycling_quality.py --smoke               # seconds: every code path, tiny sizes
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from bench_env import environment, write_atomically
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from hf_moe import moefy
from hf_moe.training import language_model_loss, read_corpus, split_documents, train_bpe_tokenizer

__all__ = ["DEFAULT_RECIPES", "RECIPES", "Settings", "main", "run"]

EOS = "<|endoftext|>"
PAD = "<pad>"
NUM_SENTINELS = 100  # T5's <extra_id_0> ... <extra_id_99>
NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0  # T5's span corruption
# each recipe: moefy's arguments beyond the shared ones (num_experts, seed); "calibration" marks the recipes that
# read training text (the kmeans router: k-means of each layer's FFN inputs on a slice of the training blocks)
RECIPES: dict[str, dict] = {
    "copy": dict(init="copy", top_k=2),
    "noise": dict(init="noise", noise_scale=0.01, top_k=2),
    "drop_upcycle r=0.5": dict(init="drop_upcycle", drop_ratio=0.5, top_k=2),
    "granular G=2": dict(init="granular", granularity=2, top_k=4),
    "kmeans router": dict(init="copy", top_k=2, router_init="kmeans", calibration=True),
    "scaled": dict(init="copy", top_k=2, normalize_top_k_weights=False, scale_weights=True),
    # WideNet (not in the default run): one shared block, started as the mean of the dense blocks or one of them
    "widenet mean": dict(init="copy", top_k=2, share_blocks_across_layers=True),
    "widenet block 0": dict(init="copy", top_k=2, share_blocks_across_layers=True, shared_block_init=0),
    "widenet last block": dict(init="copy", top_k=2, share_blocks_across_layers=True, shared_block_init="last"),
}
DEFAULT_RECIPES = [name for name in RECIPES if not name.startswith("widenet")]


@dataclass
class Settings:
    family: str = "gpt2"  # or "t5"
    text_files: list[str] | None = None
    text_pairs: str | None = None  # t5 only: a file of "source<TAB>target" lines (default: span corruption)
    corpus_chars: int = 1_000_000
    vocab_size: int = 2048
    block_size: int = 128
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    batch_size: int = 8
    learning_rate: float = 1e-3
    pretrain_steps: int = 300
    steps: int = 150
    eval_every: int = 25
    num_experts: int = 8
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    recipes: list[str] = field(default_factory=lambda: list(DEFAULT_RECIPES))
    validation_blocks: int = 64  # held-out blocks evaluated (the same ones for every model)
    calibration_blocks: int = 32  # training blocks the kmeans router reads


SMOKE = dict(
    corpus_chars=60_000, vocab_size=300, block_size=32, n_layer=2, n_embd=32, n_head=2, batch_size=4,
    pretrain_steps=4, steps=4, eval_every=2, num_experts=4, seeds=[0, 1], validation_blocks=4, calibration_blocks=4,
)  # fmt: skip


def data(settings: Settings):
    """(tokenizer, training examples, held-out examples): dicts of stacked tensors, every 20th document held out.

    GPT-2: `input_ids` = `labels` = blocks of `block_size` tokens. T5: `input_ids`, `attention_mask`, `labels` (-100
    at padding), from the text pairs or from span corruption of the blocks.
    """
    texts = read_corpus(settings.text_files, max_chars=settings.corpus_chars)
    if settings.family == "gpt2":
        tokenizer = train_bpe_tokenizer(texts, settings.vocab_size, [EOS], bos_token=EOS, eos_token=EOS, pad_token=EOS)
    else:
        sentinels = [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]
        tokenizer = train_bpe_tokenizer(
            texts, settings.vocab_size, [PAD, EOS, *sentinels], pad_token=PAD, eos_token=EOS,
            additional_special_tokens=sentinels,
        )  # fmt: skip
    if settings.text_pairs is not None:
        pairs = [line.split("\t", 1) for line in Path(settings.text_pairs).read_text().splitlines() if "\t" in line]
        if len(pairs) < 20:
            raise ValueError(
                f"--text-pairs needs at least 20 'source<TAB>target' lines, {settings.text_pairs} has {len(pairs)}"
            )
        held_out = [pair for index, pair in enumerate(pairs) if index % 20 == 19]
        kept = [pair for index, pair in enumerate(pairs) if index % 20 != 19]
        return (
            tokenizer,
            _pairs(tokenizer, kept, settings),
            _pairs(tokenizer, held_out[: settings.validation_blocks], settings),
        )
    splits = {}
    for name, documents in zip(("train", "val"), split_documents(texts, validation_every=20), strict=True):
        splits[name] = [
            token for text in documents for token in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        ]
    if len(splits["val"]) < settings.block_size:  # fewer than 20 documents: hold out the training text's tail
        tail = max(settings.block_size, len(splits["train"]) // 10)
        splits["val"], splits["train"] = splits["train"][-tail:], splits["train"][:-tail]
    blocks = {}
    for name, ids in splits.items():
        usable = len(ids) // settings.block_size * settings.block_size
        if usable == 0:
            raise ValueError(f"the corpus is too small for one {name} block of {settings.block_size} tokens")
        blocks[name] = torch.tensor(ids[:usable]).view(-1, settings.block_size)
    blocks["val"] = blocks["val"][: settings.validation_blocks]
    if settings.family == "gpt2":
        return tokenizer, *({"input_ids": b, "labels": b} for b in (blocks["train"], blocks["val"]))
    return tokenizer, *(span_corruption(b, tokenizer, seed) for seed, b in enumerate((blocks["train"], blocks["val"])))


def span_corruption(blocks_NS: torch.Tensor, tokenizer, seed: int) -> dict[str, torch.Tensor]:
    """T5's pre-training objective on every block: noise spans -> sentinels in the input, the spans in the target.

    With S tokens, n = round(0.15 S) noise tokens in m = round(n / 3) spans, every block gets its own seeded random
    split of the n noise and S - n kept tokens into m spans each (interleaved kept, noise, kept, ...), so all inputs
    have S - n + m tokens and all targets n + m + 1 (the last one EOS): no padding.
    """
    generator = torch.Generator().manual_seed(seed)
    length = blocks_NS.shape[1]
    num_noise = max(1, round(NOISE_DENSITY * length))
    num_spans = min(NUM_SENTINELS, max(1, round(num_noise / MEAN_SPAN)))
    sentinel_ids = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(num_spans)])

    def split(total: int) -> list[int]:  # `total` tokens into `num_spans` spans of at least 1, uniformly at random
        cuts = sorted(torch.randperm(total - 1, generator=generator)[: num_spans - 1].add(1).tolist())
        return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]

    inputs, targets = [], []
    for row in blocks_NS.tolist():
        source, target, position = [], [], 0
        for index, (kept, noise) in enumerate(zip(split(length - num_noise), split(num_noise), strict=True)):
            source += row[position : position + kept] + [sentinel_ids[index]]
            target += [sentinel_ids[index]] + row[position + kept : position + kept + noise]
            position += kept + noise
        inputs.append(source)
        targets.append(target + [tokenizer.eos_token_id])
    input_ids = torch.tensor(inputs)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": torch.tensor(targets)}


def _pairs(tokenizer, pairs: list[list[str]], settings: Settings) -> dict[str, torch.Tensor]:
    """Text pairs padded to the longest (at most `block_size` tokens each side); -100 at the labels' padding."""

    def encode(texts):
        return tokenizer(texts, padding=True, truncation=True, max_length=settings.block_size, return_tensors="pt")

    sources, targets = encode([source for source, _ in pairs]), encode([target for _, target in pairs])
    labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, -100)
    return {"input_ids": sources["input_ids"], "attention_mask": sources["attention_mask"], "labels": labels}


def dense_model(settings: Settings, tokenizer):
    if settings.family == "t5":
        config = T5Config(
            vocab_size=len(tokenizer), d_model=settings.n_embd, d_ff=4 * settings.n_embd, d_kv=settings.n_embd // settings.n_head,
            num_layers=settings.n_layer // 2 or 1, num_heads=settings.n_head, dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        return T5ForConditionalGeneration(config)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=settings.block_size,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # transformers cannot tell from the class name "GPT2LMHeadModel"
    return model


def heldout_loss(model, validation: dict[str, torch.Tensor]) -> float:
    rows = len(validation["input_ids"])
    return language_model_loss(model, [{k: v[i] for k, v in validation.items()} for i in range(rows)], batch_size=16)


def train(model, train_blocks, settings: Settings, seed: int, steps: int, validation=None, time_budget_s=None):
    """AdamW for `steps` steps on batches drawn in the seed's order. Returns the held-out curve [(step, loss)], the
    training seconds, and (step, loss) at the moment the training time first reaches `time_budget_s`."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_blocks["input_ids"]), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    curve = [] if validation is None else [(0, heldout_loss(model, validation))]
    same_time, trained_s = None, 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        model.train()
        index = order[(torch.arange(settings.batch_size) + (step - 1) * settings.batch_size) % len(order)]
        batch = {name: tensor[index] for name, tensor in train_blocks.items()}
        loss = model(**batch).loss  # MoE: the LM loss plus the router losses, as in training
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        trained_s += time.perf_counter() - start
        if validation is None:
            continue
        if time_budget_s is not None and same_time is None and trained_s >= time_budget_s:
            same_time = (step, heldout_loss(model, validation))
        if step % settings.eval_every == 0 or step == steps:
            curve.append((step, heldout_loss(model, validation)))
    if time_budget_s is not None and same_time is None:  # slower than dense never happened: it finished in time
        same_time = curve[-1]
    model.eval()
    return curve, trained_s, same_time


def run(settings: Settings, log=print) -> dict:
    unknown = [name for name in settings.recipes if name not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    torch.manual_seed(0)
    tokenizer, train_blocks, validation = data(settings)
    log(f"data: {len(train_blocks['input_ids'])} training and {len(validation['input_ids'])} held-out examples")
    base = dense_model(settings, tokenizer)
    train(base, train_blocks, settings, seed=0, steps=settings.pretrain_steps)
    base_loss = heldout_loss(base, validation)
    log(f"pre-trained dense {settings.family} ({base.num_parameters():,} parameters): held-out loss {base_loss:.4f}")

    with tempfile.TemporaryDirectory() as folder:
        # the kmeans router tokenizes its calibration text with the source folder's tokenizer
        base.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        calibration = [
            tokenizer.decode(ids, skip_special_tokens=True)
            for ids in train_blocks["input_ids"][: settings.calibration_blocks]
        ]
        runs = []
        for seed in settings.seeds:
            dense = copy.deepcopy(base)
            curve, dense_s, _ = train(dense, train_blocks, settings, seed, settings.steps, validation)
            runs.append({"recipe": "dense", "seed": seed, "curve": curve, "seconds": dense_s, "same_time": curve[-1]})
            log(f"seed {seed} dense: {curve[-1][1]:.4f} after {settings.steps} steps ({dense_s:.0f} s)")
            for name in settings.recipes:
                arguments = dict(RECIPES[name])
                if arguments.pop("calibration", False):
                    arguments["calibration_data"] = calibration
                if arguments.get("shared_block_init") == "last":
                    arguments["shared_block_init"] = settings.n_layer - 1
                moe = moefy(folder, num_experts=settings.num_experts, seed=seed, progress=False, **arguments)
                if settings.family == "gpt2":
                    moe.loss_type = "ForCausalLM"
                curve, moe_s, same_time = train(moe, train_blocks, settings, seed, settings.steps, validation, dense_s)
                runs.append({"recipe": name, "seed": seed, "curve": curve, "seconds": moe_s, "same_time": same_time})
                log(
                    f"seed {seed} {name}: start {curve[0][1]:.4f}, {curve[-1][1]:.4f} after {settings.steps} steps "
                    f"({moe_s:.0f} s); {same_time[1]:.4f} at dense's time (step {same_time[0]})"
                )
    return {
        "settings": asdict(settings),
        "environment": environment(),
        "base_heldout_loss": base_loss,
        "runs": runs,
        "rows": summarize(runs, settings),
    }


def summarize(runs: list[dict], settings: Settings) -> list[dict]:
    """One row per recipe: mean ± std over seeds at the same steps and at the same time, and the paired gap to dense."""
    dense = {run["seed"]: run for run in runs if run["recipe"] == "dense"}
    rows = []
    for name in ["dense", *settings.recipes]:
        mine = [run for run in runs if run["recipe"] == name]
        steps_loss = [run["curve"][-1][1] for run in mine]
        time_loss = [run["same_time"][1] for run in mine]
        rows.append(
            {
                "recipe": name,
                "start": _mean_std([run["curve"][0][1] for run in mine]),
                "same_steps": _mean_std(steps_loss),
                "same_steps_vs_dense": _mean_std([run["curve"][-1][1] - dense[run["seed"]]["curve"][-1][1] for run in mine]),
                "same_time": _mean_std(time_loss),
                "same_time_vs_dense": _mean_std([run["same_time"][1] - dense[run["seed"]]["curve"][-1][1] for run in mine]),
                "steps_in_dense_time": statistics.mean(run["same_time"][0] for run in mine),
                "seconds": statistics.mean(run["seconds"] for run in mine),
            }
        )  # fmt: skip
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_table(rows: list[dict]) -> str:
    def cell(pair):
        return f"{pair[0]:.4f} ± {pair[1]:.4f}"

    def gap(pair):
        return f"{pair[0]:+.4f} ± {pair[1]:.4f}"

    header = "| recipe | start | same steps | vs dense | same wall time | vs dense | steps in dense's time | s / run |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['recipe']} | {row['start'][0]:.4f} | {cell(row['same_steps'])} | {gap(row['same_steps_vs_dense'])} "
            f"| {cell(row['same_time'])} | {gap(row['same_time_vs_dense'])} | {row['steps_in_dense_time']:.0f} "
            f"| {row['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Held-out loss over steps, mean over seeds, one line per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in ["dense", *result["settings"]["recipes"]]:
        curves = [run["curve"] for run in result["runs"] if run["recipe"] == name]
        steps = [step for step, _ in curves[0]]
        means = [statistics.mean(curve[i][1] for curve in curves) for i in range(len(steps))]
        axes.plot(steps, means, label=name, linewidth=2.5 if name == "dense" else 1.5)
    axes.set_xlabel("training step after upcycling")
    axes.set_ylabel("held-out LM loss (nats / token)")
    axes.set_title(f"upcycled vs dense, mean of {len(result['settings']['seeds'])} seeds")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("gpt2", "t5"), default="gpt2", help="the dense model (default: gpt2)")
    parser.add_argument("--text-files", nargs="+", default=None, help="local text (default: the stdlib's source)")
    parser.add_argument("--text-pairs", default=None, help="t5: 'source<TAB>target' lines (default: span corruption)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2")
    parser.add_argument("--steps", type=int, default=None, help="steps after upcycling (default: 150)")
    parser.add_argument("--recipes", nargs="+", default=None, help=f"of {list(RECIPES)} (default: {DEFAULT_RECIPES})")
    parser.add_argument("--batch-size", type=int, default=None, help="blocks per step (default: 8)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="dense pre-training steps (default: 300)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and steps: every code path in seconds")
    parser.add_argument(
        "--json", default=None, help="where to save the rows (default: outputs/upcycling_quality*.json)"
    )
    parser.add_argument("--plot", default=None, help="where to save the plot ('' skips; default: beside the JSON)")
    args = parser.parse_args(argv)
    settings = Settings(**(SMOKE if args.smoke else {}))
    if args.text_pairs is not None and args.family != "t5":
        parser.error("--text-pairs needs --family t5")
    for name in ("family", "text_files", "text_pairs", "seeds", "steps", "recipes", "batch_size", "pretrain_steps"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    stem = "outputs/upcycling_quality" + ("" if settings.family == "gpt2" else f"_{settings.family}")
    args.json = args.json or f"{stem}.json"
    args.plot = f"{stem}.png" if args.plot is None else args.plot
    result = run(settings)
    print(markdown_table(result["rows"]))
    write_atomically(Path(args.json), json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)
    print(f"saved {args.json}" + (f" and {args.plot}" if args.plot else ""), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
