"""The README's main job, end to end and offline: pretrain a small dense GPT-2, moefy it, train both on, compare.

1. corpus: text every machine has (the Python standard library's source) or the user's own text files;
2. tokenizer: a byte-level BPE trained on the fly (or the tokenizer of `--model`);
3. dense base: a small GPT-2 trained for `pretrain_steps` (or `--model`, a dense GPT-2 folder / Hub id);
4. moefy: copy the base into an MoE model (experts, top-k and init as set);
5. continue: the dense base and the MoE model train for the same steps on the same batches;
6. compare: validation language-model loss (router losses excluded) over the run, and the MoE's load balance;
7. save both models with model cards, the results as JSON and a plot.

Sizes default to a CPU budget of a few minutes; the DESIGN notes explain why the MoE gain is small at this scale.
"""

from __future__ import annotations

import json
import math
import sysconfig
import time
from dataclasses import asdict, dataclass, field
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
from .modeling.configuration_moe import MoeConfigFields
from .modeling.moe_parts import moe_blocks

__all__ = ["DemoResult", "DemoSettings", "run_demo"]

EOS = "<|endoftext|>"


@dataclass
class DemoSettings:
    output_dir: Path = Path("hf_moe_demo")
    text_files: list[Path] | None = None  # default: the Python standard library's source files
    model: str | None = None  # a dense GPT-2 folder or Hub id to start from instead of pretraining one
    corpus_bytes: int = 1_500_000
    vocab_size: int = 2048
    block_size: int = 128
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    batch_size: int = 16
    pretrain_steps: int = 300
    steps: int = 300
    learning_rate: float = 1e-3
    eval_every: int = 50
    num_experts: int = 8
    top_k: int = 2
    init: str = "copy"
    seed: int = 0


@dataclass
class DemoResult:
    base_validation_loss: float
    dense_validation_loss: float
    moe_validation_loss: float
    curves: dict[str, list[tuple[int, float]]]  # "dense" / "moe": (step, validation loss)
    load_balance: dict[str, list[float]]  # MoE layer -> fraction of routed tokens per expert (validation)
    seconds: dict[str, float]
    parameters: dict[str, int] = field(default_factory=dict)


def run_demo(settings: DemoSettings, log=print) -> DemoResult:
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    out = Path(settings.output_dir)
    texts = _read_corpus(settings)
    tokenizer = _tokenizer(settings, texts)
    train_blocks, val_blocks = _blocks(tokenizer, texts, settings.block_size)
    log(
        f"corpus: {len(train_blocks)} training and {len(val_blocks)} validation blocks of {settings.block_size} tokens"
    )
    seconds = {"data": time.perf_counter() - started}

    if settings.model is None:
        base = _small_gpt2(settings, len(tokenizer))
        log(f"pretraining a dense GPT-2 ({base.num_parameters():,} parameters) for {settings.pretrain_steps} steps")
        seconds["pretrain"] = _train(base, train_blocks, settings, settings.pretrain_steps, out / "runs" / "base")
    else:
        base = GPT2LMHeadModel.from_pretrained(settings.model)
    base_loss = language_model_loss(base, val_blocks)
    log(f"dense base: validation loss {base_loss:.4f}")

    moe = moefy(base, num_experts=settings.num_experts, top_k=settings.top_k, init=settings.init, seed=settings.seed)
    moe_start_loss = language_model_loss(moe, val_blocks)
    log(f"moefy ({settings.init}, {settings.num_experts} experts, top-{settings.top_k}): loss {moe_start_loss:.4f}")

    curves, timings = {}, {}
    for name, model in (("dense", base), ("moe", moe)):
        curve = [(0, base_loss if name == "dense" else moe_start_loss)]
        log(f"training the {name} model for {settings.steps} steps")
        timings[name] = _train(
            model, train_blocks, settings, settings.steps, out / "runs" / name, val_blocks=val_blocks, curve=curve
        )
        curves[name] = curve
    seconds.update({f"train_{name}": value for name, value in timings.items()})

    for _, block in moe_blocks(moe):
        block.reset_counters()
    dense_loss, moe_loss = language_model_loss(base, val_blocks), language_model_loss(moe, val_blocks)
    load_balance = {
        name: (block.routed_tokens_per_expert / block.routed_tokens_per_expert.sum()).tolist()
        for name, block in moe_blocks(moe)
    }
    result = DemoResult(
        base_validation_loss=base_loss,
        dense_validation_loss=dense_loss,
        moe_validation_loss=moe_loss,
        curves=curves,
        load_balance=load_balance,
        seconds=seconds,
        parameters={"dense": base.num_parameters(), **moe.config.parameter_counts()},
    )
    seconds["total"] = time.perf_counter() - started
    _save(out, base, moe, tokenizer, result, settings, log)
    _print_summary(result, settings, log)
    return result


def language_model_loss(model: PreTrainedModel, blocks_NS: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy over `blocks_NS` (router losses excluded, so dense and MoE compare)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks_NS), batch_size):
            input_ids = blocks_NS[start : start + batch_size].to(model.device)
            logits = model(input_ids).logits[:, :-1]
            targets = input_ids[:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
    model.train(was_training)
    return total / count


def _read_corpus(settings: DemoSettings) -> list[str]:
    if settings.text_files:
        missing = [str(path) for path in settings.text_files if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"text files not found: {', '.join(missing)}")
        files = [Path(path) for path in settings.text_files]
    else:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        # sorted, tests left out: the same corpus on every machine with this Python version
        files = sorted(p for p in stdlib.rglob("*.py") if not {"test", "tests", "site-packages"} & set(p.parts))
    texts, size = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
        if size >= settings.corpus_bytes:
            break
    if size == 0:
        raise ValueError("the corpus is empty")
    return texts


def _tokenizer(settings: DemoSettings, texts: list[str]) -> PreTrainedTokenizerFast:
    if settings.model is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(settings.model)
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=settings.vocab_size, min_frequency=2, special_tokens=[EOS])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def _blocks(tokenizer, texts: list[str], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation blocks (N, S): every 20th document is validation, so no text is in both."""
    splits: dict[str, list[int]] = {"train": [], "val": []}
    for index, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        splits["val" if index % 20 == 19 else "train"].extend(ids)
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
    return GPT2LMHeadModel(config)


class _ValidationCurve(TrainerCallback):
    """Validation LM loss every `every` steps, without the router losses the Trainer's eval loss would include."""

    def __init__(self, model, val_blocks, every: int, curve: list):
        self.model, self.val_blocks, self.every, self.curve = model, val_blocks, every, curve

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.curve.append((state.global_step, language_model_loss(self.model, self.val_blocks)))


def _train(model, train_blocks, settings: DemoSettings, steps: int, run_dir: Path, val_blocks=None, curve=None):
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
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    callbacks = [] if curve is None else [_ValidationCurve(model, val_blocks, settings.eval_every, curve)]
    started = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks).train()
    model.eval()
    return time.perf_counter() - started


def _save(out: Path, dense, moe, tokenizer, result: DemoResult, settings: DemoSettings, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    training = {"steps after the dense base": settings.steps, "batch size": settings.batch_size, "seed": settings.seed}
    for name, model, loss in (
        ("dense", dense, result.dense_validation_loss),
        ("moe", moe, result.moe_validation_loss),
    ):
        eval_results = {"validation loss": round(loss, 4), "validation perplexity": round(math.exp(loss), 2)}
        write_card = _card_writer(model, f"hf_moe demo: {name}", training, eval_results)
        save_converted(model, out / name, tokenizer=tokenizer, overwrite=True, write_extras=write_card)
    (out / "demo_results.json").write_text(
        json.dumps({"settings": _jsonable(asdict(settings)), "result": asdict(result)}, indent=2) + "\n"
    )
    try:
        _plot(out / "demo.png", result)
    except ImportError:
        log("matplotlib is not installed: no plot (pip install 'hf-moe[plot]')")


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


def _plot(path: Path, result: DemoResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, balance) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in result.curves.items():
        steps, losses = zip(*curve, strict=True)
        curves.plot(steps, losses, marker="o", label=name)
    curves.set(xlabel="steps after moefy", ylabel="validation loss", title="dense vs MoE, same batches")
    curves.legend()
    layers = list(result.load_balance)
    fractions = [result.load_balance[name] for name in layers]
    image = balance.imshow(fractions, aspect="auto", cmap="viridis")
    balance.set(xlabel="expert", ylabel="MoE layer", title="fraction of routed tokens (validation)")
    balance.set_yticks(range(len(layers)), [name.split(".mlp")[0] for name in layers])
    figure.colorbar(image, ax=balance)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _print_summary(result: DemoResult, settings: DemoSettings, log) -> None:
    gain = result.dense_validation_loss - result.moe_validation_loss
    log("")
    log(f"validation loss after {settings.steps} more steps on the same batches:")
    log(f"  dense base before:  {result.base_validation_loss:.4f}")
    log(f"  dense, continued:   {result.dense_validation_loss:.4f}")
    log(
        f"  MoE, upcycled:      {result.moe_validation_loss:.4f}  ({'better' if gain > 0 else 'worse'} by {abs(gain):.4f})"
    )
    log(
        f"  step time: MoE / dense = {result.seconds['train_moe'] / result.seconds['train_dense']:.2f}x; "
        f"parameters {result.parameters['total']:,} MoE ({result.parameters['active']:,} active) "
        f"vs {result.parameters['dense']:,} dense"
    )
    log("load balance (fraction of routed tokens per expert, validation):")
    for name, fractions in result.load_balance.items():
        imbalance = max(fractions) * len(fractions)
        log(f"  {name.split('.mlp')[0]}: {' '.join(f'{f:.2f}' for f in fractions)}  (max/mean {imbalance:.2f})")
    log(f"saved to {settings.output_dir} (dense/, moe/, demo_results.json, demo.png)")
