"""The README's main job, end to end and offline: pretrain a small dense GPT-2, moefy it, train both on, compare.

1. corpus: text every machine has (the Python standard library's source) or the user's own text files;
2. tokenizer: a byte-level BPE trained on the fly (or the tokenizer of `--model`);
3. dense base: a small GPT-2 trained for `pretrain_steps` (or `--model`, a dense GPT-2 folder / Hub id);
4. moefy: copy the base into an MoE model (experts, top-k and init as set);
5. continue: the dense base and the MoE model train for the same steps on the same batches, once per seed;
6. compare: validation language-model loss (router losses excluded) over the run, and the MoE's load balance;
7. save both models (of the first seed) with model cards, the results as JSON and a plot.

The corpus, the tokenizer and the validation loss come from `hf_moe.training` (`read_corpus`, `train_bpe_tokenizer`,
`language_model_loss`), so the demo measures what a user's own script would.

Sizes default to a CPU budget of a few minutes. At this scale the MoE's gain is small: identical expert copies
diverge slowly, so an upcycled model pulls ahead of its dense twin only over hundreds of steps. `--seeds` measures
whether a gain stands out from seed-to-seed noise.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import textwrap
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from .conversion import moefy, save_converted
from .demo_settings import DemoSettings
from .modeling.configuration_moe import MoeConfigFields
from .modeling.moe_parts import moe_blocks
from .training.perplexity import language_model_loss
from .training.text_data import read_corpus, split_documents, train_bpe_tokenizer

__all__ = ["DEFAULT_SETTINGS_SPREAD", "DemoResult", "DemoSettings", "demo_figure", "run_demo"]

EOS = "<|endoftext|>"
VALIDATION_BATCH_SIZE = 32


# The gain's seed-to-seed spread at the default settings, measured once so that a single default run can say whether
# its gain stands out from noise. Only the comparison is repeated (router init, data order, dropout); the pretrained
# base and the validation set (75 blocks of 128 tokens) are the same. Measured 2026-12-01 with
# `hf-moe demo --seeds 0 1 2 --output-dir /tmp/demo_seeds` (26 min 42 s wall, 1.2 GB peak RSS) on the 2-core
# development CPU while other jobs shared it, Python 3.11.7 (its standard library is the corpus), torch 2.13.0 CPU,
# transformers 5.24.0. Per seed, dense / MoE validation loss: 5.1041 / 5.0737, 5.0956 / 5.0708, 5.0929 / 5.0605.
DEFAULT_SETTINGS_SPREAD: dict | None = {
    "command": "hf-moe demo --seeds 0 1 2",
    "date": "2026-12-01",
    "machine": "a 2-core CPU",
    "seeds": [0, 1, 2],
    "gains": [0.030341, 0.024797, 0.032357],  # dense - MoE, from that run's demo_results.json
}


@dataclass
class DemoResult:
    base_validation_loss: float
    dense_validation_loss: float  # of the first seed, like everything below that is not per seed
    moe_validation_loss: float
    curves: dict[str, list[tuple[int, float]]]  # "dense" / "moe": (step, validation loss)
    load_balance: dict[str, list[float]]  # MoE layer -> fraction of routed tokens per expert (validation)
    seconds: dict[str, float]
    parameters: dict[str, int] = field(default_factory=dict)
    # one entry per seed: {"seed", "dense_validation_loss", "moe_validation_loss", "gain"} (gain = dense - MoE)
    per_seed: list[dict] = field(default_factory=list)
    validation_tokens: int = 0

    @property
    def gains(self) -> list[float]:
        return [run["gain"] for run in self.per_seed]


@dataclass
class _Comparison:
    """One seed's continue-training comparison."""

    seed: int
    dense: PreTrainedModel | None
    moe: PreTrainedModel | None
    dense_loss: float
    moe_loss: float
    curves: dict[str, list[tuple[int, float]]]
    seconds: dict[str, float]
    load_balance: dict[str, list[float]]


def run_demo(settings: DemoSettings, log=print) -> DemoResult:
    seeds = list(settings.seeds) if settings.seeds else [settings.seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    for line in _introduction(settings, seeds):
        log(line)
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    out = Path(settings.output_dir)
    texts = read_corpus(settings.text_files, max_chars=settings.corpus_bytes)
    tokenizer = _tokenizer(settings, texts)
    train_blocks, val_blocks = _blocks(tokenizer, texts, settings.block_size)
    validation = [{"input_ids": block} for block in val_blocks]
    log(
        f"corpus: {len(train_blocks)} training and {len(val_blocks)} validation blocks of {settings.block_size} tokens"
    )
    seconds = {"data": time.perf_counter() - started}

    if settings.model is None:
        base = _small_gpt2(settings, len(tokenizer))
        log(f"pretraining a dense GPT-2 ({base.num_parameters():,} parameters) for {settings.pretrain_steps} steps")
        seconds["pretrain"] = _train(
            base, train_blocks, settings, settings.pretrain_steps, settings.seed, out / "runs" / "base"
        )
    else:
        base = GPT2LMHeadModel.from_pretrained(settings.model)
        _use_causal_lm_loss(base)
    base_loss = language_model_loss(base, validation, batch_size=VALIDATION_BATCH_SIZE)
    log(f"dense base: validation loss {base_loss:.4f}")

    runs = []
    for seed in seeds:
        runs.append(
            _compare(base, base_loss, train_blocks, validation, settings, seed, out, log, keep_models=not runs)
        )
    first = runs[0]
    seconds.update({f"train_{name}": value for name, value in first.seconds.items()})
    result = DemoResult(
        base_validation_loss=base_loss,
        dense_validation_loss=first.dense_loss,
        moe_validation_loss=first.moe_loss,
        curves=first.curves,
        load_balance=first.load_balance,
        seconds=seconds,
        parameters={"dense": base.num_parameters(), **first.moe.config.parameter_counts()},
        validation_tokens=val_blocks.numel(),
        per_seed=[
            {
                "seed": run.seed,
                "dense_validation_loss": run.dense_loss,
                "moe_validation_loss": run.moe_loss,
                "gain": run.dense_loss - run.moe_loss,
            }
            for run in runs
        ],
    )
    seconds["total"] = time.perf_counter() - started
    _save(out, first.dense, first.moe, tokenizer, result, settings, log)
    for line in _summary(result, settings):
        log(line)
    return result


def _compare(
    base, base_loss: float, train_blocks, validation, settings: DemoSettings, seed: int, out: Path, log, keep_models
) -> _Comparison:
    """Upcycle a copy of `base` and train it and another copy of `base` for the same steps on the same batches."""
    # moefy copies the weights, so training the dense twin below cannot change the MoE's starting point
    moe = moefy(base, num_experts=settings.num_experts, top_k=settings.top_k, init=settings.init, seed=seed)
    dense = copy.deepcopy(base)  # the pretrained base stays untouched for the next seed
    moe_start_loss = language_model_loss(moe, validation, batch_size=VALIDATION_BATCH_SIZE)
    log(
        f"moefy ({settings.init}, {settings.num_experts} experts, top-{settings.top_k}, seed {seed}): "
        f"validation loss {moe_start_loss:.4f}"
    )
    curves, seconds = {}, {}
    for name, model, start_loss in (("dense", dense, base_loss), ("moe", moe, moe_start_loss)):
        curve = [(0, start_loss)]
        log(f"training the {name} model for {settings.steps} steps (seed {seed})")
        seconds[name] = _train(
            model,
            train_blocks,
            settings,
            settings.steps,
            seed,
            out / "runs" / name,
            validation=validation,
            curve=curve,
        )
        curves[name] = curve
    dense_loss = language_model_loss(dense, validation, batch_size=VALIDATION_BATCH_SIZE)
    # the load balance is counted during the MoE's validation pass: counters zeroed first, then left as counted
    for _, block in moe_blocks(moe):
        block.reset_counters()
    moe_loss = language_model_loss(moe, validation, batch_size=VALIDATION_BATCH_SIZE, count_routing=True)
    load_balance = {
        name: (block.routed_tokens_per_expert / block.routed_tokens_per_expert.sum()).tolist()
        for name, block in moe_blocks(moe)
    }
    log(f"seed {seed}: validation loss dense {dense_loss:.4f}, MoE {moe_loss:.4f} (gain {dense_loss - moe_loss:+.4f})")
    if not keep_models:
        dense = moe = None
    return _Comparison(seed, dense, moe, dense_loss, moe_loss, curves, seconds, load_balance)


def _tokenizer(settings: DemoSettings, texts: list[str]) -> PreTrainedTokenizerFast:
    if settings.model is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(settings.model)
    # trained on all the text, validation files included: the vocabulary, not the model, sees them
    return train_bpe_tokenizer(texts, settings.vocab_size, [EOS], bos_token=EOS, eos_token=EOS, pad_token=EOS)


def _blocks(tokenizer, texts: list[str], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation blocks (N, S): every 20th document is validation, so no text is in both."""
    documents = dict(zip(("train", "val"), split_documents(texts, validation_every=20), strict=True))
    splits: dict[str, list[int]] = {}
    for name, docs in documents.items():
        splits[name] = [token for text in docs for token in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    if len(splits["val"]) < block_size:  # a tiny corpus: hold out its tail instead
        tail = max(block_size, len(splits["train"]) // 10)
        splits["val"], splits["train"] = splits["train"][-tail:], splits["train"][:-tail]
    blocks = {}
    for name, ids in splits.items():
        usable = len(ids) // block_size * block_size
        if usable == 0:
            raise ValueError(f"the corpus is too small for one {name} block of {block_size} tokens")
        blocks[name] = torch.tensor(ids[:usable]).view(-1, block_size)
    return blocks["train"], blocks["val"]


def _use_causal_lm_loss(model: GPT2LMHeadModel) -> None:
    # transformers picks a model's loss by its class name; "GPT2LMHeadModel" contains no "ForCausalLM", so every
    # loss computation would log "`loss_type=None` was set in the config but it is unrecognized" before falling back
    # to that very loss, and Trainer, which asks the same question, would count all labels of a row for
    # `num_items_in_batch` instead of the shifted ones (all but the first), scaling the dense loss by (S-1)/S while
    # the MoE's is not. Naming it drops the warning and normalizes both models' losses alike.
    model.loss_type = "ForCausalLM"


def _small_gpt2(settings: DemoSettings, vocab_size: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=settings.block_size,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    _use_causal_lm_loss(model)
    return model


class _ValidationCurve(TrainerCallback):
    """Validation LM loss every `every` steps, without the router losses the Trainer's eval loss would include."""

    def __init__(self, model, validation, every: int, curve: list):
        self.model, self.validation, self.every, self.curve = model, validation, every, curve

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            loss = language_model_loss(self.model, self.validation, batch_size=VALIDATION_BATCH_SIZE)
            self.curve.append((state.global_step, loss))


def _train(
    model, train_blocks, settings: DemoSettings, steps: int, seed: int, run_dir: Path, validation=None, curve=None
):
    from datasets import Dataset

    dataset = Dataset.from_dict({"input_ids": train_blocks.tolist(), "labels": train_blocks.tolist()})
    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(30, steps // 10),
        weight_decay=0.01,
        logging_steps=max(1, settings.eval_every),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    callbacks = [] if curve is None else [_ValidationCurve(model, validation, settings.eval_every, curve)]
    started = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks).train()
    model.eval()
    return time.perf_counter() - started


def _save(out: Path, dense, moe, tokenizer, result: DemoResult, settings: DemoSettings, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _remove_empty_folders(out / "runs")  # the Trainers' output folders: nothing is saved there (save_strategy="no")
    seed = result.per_seed[0]["seed"]
    training = {"steps after the dense base": settings.steps, "batch size": settings.batch_size, "seed": seed}
    for name, model, loss in (
        ("dense", dense, result.dense_validation_loss),
        ("moe", moe, result.moe_validation_loss),
    ):
        eval_results = {"validation loss": round(loss, 4), "validation perplexity": round(math.exp(loss), 2)}
        write_card = _card_writer(model, f"hf_moe demo: {name}", training, eval_results)
        save_converted(model, out / name, tokenizer=tokenizer, overwrite=True, write_extras=write_card)
    payload = {
        "settings": _jsonable(asdict(settings)),
        "result": asdict(result),
        "gain": _gain_statistics(result.gains),
    }
    partial = out / f"demo_results.json.partial-{os.getpid()}"
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(out / "demo_results.json")
    try:
        from .training.plots import save_figure

        save_figure(demo_figure(result), out / "demo.png")
    except ImportError:
        log("matplotlib is not installed: no plot (pip install 'hf-moe[plot]')")


def _remove_empty_folders(folder: Path) -> None:
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


def _card_writer(model: PreTrainedModel, title: str, training: dict, eval_results: dict):
    """Writes the model's card: hf_moe's MoE card, or a short card for the dense GPT-2 it is compared with."""
    from huggingface_hub import ModelCard, ModelCardData

    from .hub import render_model_card, save_model_card

    def write(folder: Path) -> None:
        report = getattr(model, "moefy_report", None)
        if isinstance(model.config, MoeConfigFields):
            card = render_model_card(
                model.config,
                report=None if report is None else report.to_dict(),
                model_name=title,
                training_results=training,
                eval_results=eval_results,
            )
        else:
            data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=["gpt2", "hf_moe"])
            rows = "\n".join(f"| {key} | {value} |" for key, value in {**training, **eval_results}.items())
            body = (
                f"# {title}\n\nThe dense GPT-2 that `hf-moe demo` trained for the same steps as its MoE upcycle, "
                f"as a baseline.\n\n| | |\n|---|---|\n{rows}\n"
            )
            card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
        save_model_card(folder, card)

    return write


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def demo_figure(result: DemoResult):
    """The demo's picture as a matplotlib Figure: validation-loss curves, and the MoE's load balance as a heatmap
    whose colorbar marks 1/E, perfect balance (needs matplotlib: `pip install hf-moe[plot]`)."""
    from .training.plots import agg_figure, draw_token_fraction_heatmap

    figure = agg_figure((11, 4))
    curves, balance = figure.subplots(1, 2)
    for name, curve in result.curves.items():
        steps, losses = zip(*curve, strict=True)
        curves.plot(steps, losses, marker="o", label=name)
    curves.set(
        xlabel="steps after moefy", ylabel="validation loss (nats per token)", title="dense vs MoE, same batches"
    )
    curves.legend()
    layers = list(result.load_balance)
    draw_token_fraction_heatmap(
        figure,
        balance,
        [result.load_balance[name] for name in layers],
        layer_names=[name.split(".mlp")[0] for name in layers],
    )
    balance.set_title("MoE load balance (validation)")
    figure.tight_layout()
    return figure


# ---- what the demo tells a newcomer ------------------------------------------------------------------------------


TEXT_WIDTH = 112  # printed lines stay readable in an 80-to-120-column terminal


def _paragraph(text: str) -> list[str]:
    return textwrap.wrap(text, width=TEXT_WIDTH, initial_indent="  ", subsequent_indent="  ")


def _introduction(settings: DemoSettings, seeds: list[int]) -> list[str]:
    experts, k = settings.num_experts, settings.top_k
    made = "copies of it" if settings.init == "copy" else f"initialized from it with --init {settings.init}"
    # copies with renormalized top-k weights (k >= 2) sum to the dense output; top-1 scales it by the router's weight
    start = "exactly what" if settings.init == "copy" and k >= 2 else "close to what"
    base = (
        f"start from the dense GPT-2 {settings.model}"
        if settings.model
        else f"pretrain a small dense GPT-2 for {settings.pretrain_steps} steps"
    )
    corpus = "your text files" if settings.text_files else "the Python standard library's source"
    repeat = f", once per seed ({', '.join(map(str, seeds))})" if len(seeds) > 1 else ""
    return [
        "hf-moe demo: upcycling a dense GPT-2 into a Mixture-of-Experts (MoE), offline.",
        *_paragraph(
            f"Upcycling turns each feed-forward layer of a trained dense model into {experts} experts ({made}) and "
            f"a router that sends every token to {k} of them: the MoE starts out computing {start} the dense model "
            f"computes, with {experts}x the feed-forward parameters but only {k} experts' compute per token."
        ),
        *_paragraph(
            f"Plan: {base} on {corpus}, upcycle it, train the dense model and the MoE {settings.steps} more steps "
            f"each on the same batches{repeat}, and compare their validation loss."
        ),
        "",
    ]


def _gain_statistics(gains: list[float]) -> dict:
    """Mean and sample standard deviation of the per-seed gains (std and verdict need two seeds or more)."""
    stats = {"n": len(gains), "mean": statistics.fmean(gains) if gains else math.nan, "std": None}
    if len(gains) >= 2:
        stats["std"] = statistics.stdev(gains)
    return stats


def _verdict(gains: list[float]) -> str:
    stats = _gain_statistics(gains)
    if stats["std"] is None:
        return "One seed cannot say whether the gain stands out from seed noise."
    standard_error = stats["std"] / math.sqrt(stats["n"])
    better = sum(gain > 0 for gain in gains)
    if better in (0, len(gains)) and abs(stats["mean"]) > 2 * standard_error:
        direction = "better" if better else "worse"
        return (
            f"The MoE is {direction} with every seed and the mean is more than twice its standard error "
            f"({standard_error:.4f}): a consistent difference at these settings."
        )
    return (
        f"The MoE is better with {better} of {len(gains)} seeds and the mean is within twice its standard error "
        f"({standard_error:.4f}): not distinguishable from seed noise at these settings."
    )


def _spread_line(gains: list[float]) -> str:
    stats = _gain_statistics(gains)
    per_seed = ", ".join(f"{gain:+.4f}" for gain in gains)
    return f"gain {stats['mean']:+.4f} ± {stats['std']:.4f} nats (mean ± std over {stats['n']} seeds: {per_seed})"


def _is_default(settings: DemoSettings) -> bool:
    defaults = DemoSettings()
    ignored = {"output_dir", "seeds"}
    return all(
        getattr(settings, f.name) == getattr(defaults, f.name) for f in fields(DemoSettings) if f.name not in ignored
    )


def _summary(result: DemoResult, settings: DemoSettings) -> list[str]:
    gain = result.dense_validation_loss - result.moe_validation_loss
    experts = len(next(iter(result.load_balance.values()), [])) or settings.num_experts
    step_ratio = result.seconds["train_moe"] / result.seconds["train_dense"]
    lines = [
        "",
        f"validation loss after {settings.steps} more steps on the same batches (seed {result.per_seed[0]['seed']}):",
        f"  dense base before:  {result.base_validation_loss:.4f}",
        f"  dense, continued:   {result.dense_validation_loss:.4f}",
        f"  MoE, upcycled:      {result.moe_validation_loss:.4f}  "
        f"({'better' if gain > 0 else 'worse'} by {abs(gain):.4f})",
        f"  step time: MoE / dense = {step_ratio:.2f}x; parameters {result.parameters['total']:,} MoE "
        f"({result.parameters['active']:,} active) vs {result.parameters['dense']:,} dense",
        "load balance (fraction of routed tokens per expert, validation):",
    ]
    for name, fractions in result.load_balance.items():
        imbalance = max(fractions) * len(fractions)
        lines.append(
            f"  {name.split('.mlp')[0]}: {' '.join(f'{f:.2f}' for f in fractions)}  (max/mean {imbalance:.2f})"
        )
    lines += [
        "",
        "what the numbers mean:",
        *_paragraph(
            "Validation loss is the mean cross-entropy per token (nats) on held-out documents, router losses left "
            "out, so dense and MoE compare directly; lower is better, exp(loss) is the perplexity. "
            "Gain = dense loss - MoE loss."
        ),
        *_paragraph(
            f"Load balance: 1/{experts} = {1 / experts:.3f} of the tokens per expert is perfect balance (max/mean "
            f"1.00); max/mean {experts:.2f} would mean one expert takes every token."
        ),
    ]
    held_out = (
        "Seeds vary the router init and the data order, not the held-out text "
        f"({result.validation_tokens:,} validation tokens); one seed always gives the same numbers."
    )
    if len(result.per_seed) > 1:
        lines += _paragraph(f"Over seeds: {_spread_line(result.gains)}. {_verdict(result.gains)} {held_out}")
    elif _is_default(settings) and DEFAULT_SETTINGS_SPREAD is not None:
        measured = DEFAULT_SETTINGS_SPREAD
        lines += _paragraph(
            f"Is the gain meaningful? At these default settings: {_spread_line(measured['gains'])}. "
            f"{_verdict(measured['gains'])} {held_out} Measured on {measured['date']}, {measured['machine']}, with:"
        )
        lines.append(f"    {measured['command']}")
    else:
        lines += _paragraph("Is the gain meaningful? One seed cannot tell: add --seeds 0 1 2 to measure the spread.")
    moe_dir = Path(settings.output_dir) / "moe"
    lines += [
        "",
        f"saved to {settings.output_dir}: dense/, moe/ (models with cards), demo_results.json, demo.png",
        "load the MoE after `import hf_moe`, or without hf_moe installed from the folder's own code (for both):",
        f'  model = AutoModelForCausalLM.from_pretrained("{moe_dir}", trust_remote_code=True)',
        f'  tokenizer = AutoTokenizer.from_pretrained("{moe_dir}", trust_remote_code=True)',
    ]
    return lines
