"""Train a T5 Mixture-of-Experts model with the Hugging Face `Seq2SeqTrainer`, on text pairs or by span corruption.

Two kinds of data:
  * `--pairs-file`  supervised pairs, JSON lines ({"source": ..., "target": ...}, field names settable) or TSV
                    (source<TAB>target, no header);
  * `--text-file`   plain text, turned into T5's span-corruption task (Raffel et al. 2020, sec. 3.1.4): random spans
                    (15% of the tokens, mean length 3) are replaced by sentinels in the input, and the target lists
                    each sentinel followed by the tokens it hides. Without either, a corpus from the Python
                    standard library's source is used, so the script runs offline anywhere.

The model is a dense T5 / mT5 (`--model`, upcycled with `hf_moe.conversion.moefy`), a T5 MoE folder (`--model`,
loaded as is), or a new small dense T5 upcycled the same way. Without `--tokenizer` (or a tokenizer in `--model`)
a byte-level BPE with `<pad>`, `</s>`, `<unk>` and sentinel tokens `<extra_id_N>` is trained on the training text.
The script saves the model, its tokenizer and `metrics.json` (eval loss, perplexity, generated samples, MoE metrics).

    python examples/run_seq2seq_moe.py --output-dir outputs/seq2seq_moe
    python examples/run_seq2seq_moe.py --pairs-file pairs.jsonl --output-dir outputs/seq2seq_pairs
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset
from moe_example_utils import (
    load_pretrained_tokenizer,
    load_text_datasets,
    log_world,
    moe_metrics,
    print_short_logs,
    shut_down_distributed,
    write_json,
)
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    set_seed,
)

from hf_moe import LoadBalanceCallback
from hf_moe.conversion import moefy
from hf_moe.training import default_text_files, perplexity, train_bpe_tokenizer

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model and tokenizer")
    source.add_argument("--model", help="dense T5/mT5 (upcycled with moefy) or T5 MoE folder / Hub id; default: new")
    source.add_argument("--tokenizer", help="tokenizer folder / Hub id; default: the model's, else a BPE trained here")
    source.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the BPE trained here")
    source.add_argument("--num-sentinels", type=int, default=32, help="sentinel tokens of the BPE trained here")
    source.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer (new model or moefy)")
    source.add_argument("--top-k", type=int, default=2, help="experts per token (new model or moefy)")
    source.add_argument("--init", default="copy", help="moefy init: copy, noise, drop_upcycle or split")
    source.add_argument("--num-layers", type=int, default=2, help="new model: blocks per stack")
    source.add_argument("--d-model", type=int, default=128, help="new model: hidden size")
    source.add_argument("--d-ff", type=int, default=256, help="new model: expert hidden size (a multiple of 4)")
    source.add_argument("--num-heads", type=int, default=4, help="new model: attention heads")
    source.add_argument(
        "--feed-forward", default="relu", help="new model: T5 feed_forward_proj ('relu': v1.0, 'gated-gelu': v1.1)"
    )

    data = parser.add_argument_group("data")
    data.add_argument("--pairs-file", type=Path, help="JSON lines or TSV text pairs to train on")
    data.add_argument("--pairs-validation-file", type=Path, help="pairs to evaluate on; default: held-out pairs")
    data.add_argument("--source-field", default="source", help="JSON lines: the input field")
    data.add_argument("--target-field", default="target", help="JSON lines: the output field")
    data.add_argument("--text-file", type=Path, nargs="+", help="text for span corruption; default: stdlib source")
    data.add_argument("--validation-file", type=Path, help="span corruption: text to evaluate on")
    data.add_argument("--validation-split-percentage", type=int, default=5, help="held out without a validation file")
    data.add_argument("--corpus-bytes", type=int, default=1_000_000, help="size of the default stdlib corpus")
    data.add_argument("--input-length", type=int, default=64, help="span corruption: tokens per block before noise")
    data.add_argument("--noise-density", type=float, default=0.15, help="span corruption: share of tokens masked")
    data.add_argument("--mean-span-length", type=float, default=3.0, help="span corruption: mean masked span length")
    data.add_argument("--max-source-length", type=int, default=128, help="pairs: source tokens kept")
    data.add_argument("--max-target-length", type=int, default=64, help="pairs: target tokens kept")
    data.add_argument("--max-train-samples", type=int, help="use at most this many training examples")
    data.add_argument("--max-eval-samples", type=int, default=100, help="evaluate on at most this many examples")

    train = parser.add_argument_group("training")
    train.add_argument(
        "--output-dir", type=Path, default=Path("outputs/seq2seq_moe"), help="where the model and metrics go"
    )
    train.add_argument("--max-steps", type=int, default=200, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=8, help="examples per device per step")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (linear schedule)")
    train.add_argument("--logging-steps", type=int, default=25, help="log loss and MoE metrics every N steps")
    train.add_argument("--num-samples", type=int, default=2, help="validation examples to generate an output for")
    train.add_argument("--max-new-tokens", type=int, default=24, help="generated tokens per sample")
    train.add_argument("--report-to", default="none", help="Trainer integrations, e.g. 'tensorboard' or 'none'")
    train.add_argument("--seed", type=int, default=0, help="seeds model init, data order and the noise")
    return parser.parse_args(argv)


# --- span corruption -------------------------------------------------------------------------------------------


def random_spans_mask(length: int, noise_density: float, mean_span_length: float, rng: random.Random) -> list[bool]:
    """T5's noise mask: about `noise_density * length` noise tokens in spans of mean length `mean_span_length`,
    alternating with non-noise runs; the sequence starts with a non-noise run (as in T5) and every run is non-empty.
    """
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)

    def split(total: int, parts: int) -> list[int]:  # `total` as `parts` positive integers, uniformly at random
        cuts = sorted(rng.sample(range(1, total), parts - 1))
        return [end - start for start, end in zip([0, *cuts], [*cuts, total], strict=True)]

    mask: list[bool] = []
    for keep, noise in zip(split(length - num_noise, num_spans), split(num_noise, num_spans), strict=True):
        mask += [False] * keep + [True] * noise
    return mask


@dataclass
class SpanCorruptionCollator:
    """Turns blocks of token ids into (input_ids, labels) pairs by span corruption, padded to the batch's longest.

    Input `a b c d e f` with spans {b c} and {e}:  input `a <s0> d <s1> f </s>`,  labels `<s0> b c <s1> e </s>`.
    The noise is drawn here, per batch, so every epoch sees new spans.
    """

    sentinel_ids: list[int]
    eos_token_id: int
    pad_token_id: int
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    seed: int = 0

    def __post_init__(self):
        self.rng = random.Random(self.seed)

    def corrupt(self, ids: list[int]) -> tuple[list[int], list[int]]:
        mask = random_spans_mask(len(ids), self.noise_density, self.mean_span_length, self.rng)
        inputs: list[int] = []
        targets: list[int] = []
        span = -1
        for position, (token, noise) in enumerate(zip(ids, mask, strict=True)):
            starts_span = noise and (position == 0 or not mask[position - 1])
            if starts_span:
                span += 1
                if span >= len(self.sentinel_ids):
                    raise ValueError(
                        f"a block needs more than the tokenizer's {len(self.sentinel_ids)} sentinel tokens: "
                        "use shorter blocks, a lower noise density or longer spans"
                    )
                inputs.append(self.sentinel_ids[span])
                targets.append(self.sentinel_ids[span])
            (targets if noise else inputs).append(token)
        return inputs + [self.eos_token_id], targets + [self.eos_token_id]

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pairs = [self.corrupt(list(example["input_ids"])) for example in examples]
        input_width = max(len(inputs) for inputs, _ in pairs)
        label_width = max(len(labels) for _, labels in pairs)
        input_ids = [inputs + [self.pad_token_id] * (input_width - len(inputs)) for inputs, _ in pairs]
        labels = [labels + [-100] * (label_width - len(labels)) for _, labels in pairs]  # -100: not a target
        input_ids = torch.tensor(input_ids)
        return {
            "input_ids": input_ids,
            "attention_mask": (input_ids != self.pad_token_id).long(),
            "labels": torch.tensor(labels),
        }


def sentinel_ids(tokenizer) -> list[int]:
    """Ids of `<extra_id_0>`, `<extra_id_1>`, ... (T5's sentinel names) as far as the tokenizer has them."""
    ids = []
    while True:
        token_id = tokenizer.convert_tokens_to_ids(f"<extra_id_{len(ids)}>")
        if token_id is None or token_id == tokenizer.unk_token_id:
            return ids
        ids.append(token_id)


# --- data, tokenizer, model ------------------------------------------------------------------------------------


def training_arguments(args: argparse.Namespace) -> Seq2SeqTrainingArguments:
    return Seq2SeqTrainingArguments(
        output_dir=str(args.output_dir / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=args.logging_steps,
        save_strategy="no",  # the final model is saved below
        report_to=args.report_to,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        # the span-corruption collator reads "input_ids" only, and pairs carry exactly what the model takes
        remove_unused_columns=False,
    )


def raw_datasets(args: argparse.Namespace) -> tuple[DatasetDict, str]:
    """The raw splits and the task: "pairs" (source/target columns) or "span_corruption" (a text column)."""
    if args.pairs_file is not None:
        data_files = {"train": str(args.pairs_file)}
        if args.pairs_validation_file is not None:
            data_files["validation"] = str(args.pairs_validation_file)
        if args.pairs_file.suffix.lower() in (".tsv", ".tab"):
            # QUOTE_NONE (3): quotes are text, not CSV syntax
            raw = load_dataset(
                "csv", data_files=data_files, delimiter="\t", column_names=["source", "target"], quoting=3
            )
        else:
            raw = load_dataset("json", data_files=data_files)
            raw = raw.rename_columns({args.source_field: "source", args.target_field: "target"})
        if "validation" not in raw:
            split = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
            raw = DatasetDict(train=split["train"], validation=split["test"])
        return raw.select_columns(["source", "target"]), "pairs"
    text_files, validation_file = args.text_file, args.validation_file
    if text_files is None:
        train_file, validation_file = default_text_files(args.output_dir / "corpus", args.corpus_bytes)
        text_files = [train_file]
    return load_text_datasets(
        text_files, validation_file, args.validation_split_percentage, args.seed
    ), "span_corruption"


def load_tokenizer(args: argparse.Namespace, raw: DatasetDict):
    name = args.tokenizer or (args.model if args.model and _has_tokenizer(args.model) else None)
    if name is not None:
        return load_pretrained_tokenizer(name)
    if args.model is not None:
        raise ValueError(f"{args.model} has no tokenizer files: pass --tokenizer (the model's vocabulary)")
    columns = raw["train"].column_names
    texts = (row for column in columns for row in raw["train"][column])
    # T5's ids: pad 0 (also the decoder start), eos 1, unk 2; then the sentinels
    sentinels = [f"<extra_id_{i}>" for i in range(args.num_sentinels)]
    return train_bpe_tokenizer(
        texts,
        args.vocab_size,
        [PAD, EOS, UNK, *sentinels],
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=sentinels,
    )


def _has_tokenizer(model: str) -> bool:
    folder = Path(model)
    return not folder.is_dir() or any(
        (folder / name).is_file() for name in ("tokenizer.json", "spiece.model", "vocab.json")
    )


def load_model(args: argparse.Namespace, tokenizer) -> PreTrainedModel:
    """Upcycle a dense T5, load a T5 MoE, or build a new small one: a dense T5 with T5's own init, upcycled like a
    pretrained t5-small would be (its experts start as copies of one FFN and diverge through routing)."""
    if args.model is None:
        dense = T5ForConditionalGeneration(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=args.d_model,
                d_ff=args.d_ff,
                d_kv=args.d_model // args.num_heads,
                num_heads=args.num_heads,
                num_layers=args.num_layers,
                feed_forward_proj=args.feed_forward,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
        return moefy(dense, num_experts=args.num_experts, top_k=args.top_k, init=args.init, seed=args.seed)
    model_type = AutoConfig.from_pretrained(args.model).model_type
    if model_type == "t5_moe":
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model)
    elif model_type in ("t5", "mt5"):
        model = moefy(args.model, num_experts=args.num_experts, top_k=args.top_k, init=args.init, seed=args.seed)
    else:
        raise ValueError(f"--model must be a T5, mT5 or T5 MoE model; {args.model} has model_type {model_type!r}")
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
    return model


def tokenized_datasets(args: argparse.Namespace, raw: DatasetDict, task: str, tokenizer) -> DatasetDict:
    if task == "pairs":

        def tokenize_pairs(batch):
            encoded = tokenizer(batch["source"], max_length=args.max_source_length, truncation=True)
            encoded["labels"] = tokenizer(
                text_target=batch["target"], max_length=args.max_target_length, truncation=True
            )["input_ids"]
            return encoded

        return raw.map(tokenize_pairs, batched=True, remove_columns=["source", "target"], desc="tokenizing")

    # span corruption: the text cut into blocks of `input_length` tokens; the collator adds the noise and eos
    def tokenize_and_group(batch):
        ids = list(chain(*tokenizer(batch["text"], add_special_tokens=False)["input_ids"]))
        usable = len(ids) // args.input_length * args.input_length
        return {"input_ids": [ids[start : start + args.input_length] for start in range(0, usable, args.input_length)]}

    return raw.map(tokenize_and_group, batched=True, remove_columns=["text"], desc="tokenizing")


def collator_for(args: argparse.Namespace, task: str, tokenizer, model):
    if task == "pairs":
        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    sentinels = sentinel_ids(tokenizer)
    if not sentinels:
        raise ValueError("span corruption needs sentinel tokens <extra_id_0>, <extra_id_1>, ... in the tokenizer")
    return SpanCorruptionCollator(
        sentinel_ids=sentinels,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        noise_density=args.noise_density,
        mean_span_length=args.mean_span_length,
        seed=args.seed,
    )


def generate_samples(model, tokenizer, collator, examples: list[dict], max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy outputs for a few validation examples, next to their inputs and references (special tokens kept:
    the sentinels are the point of span corruption)."""
    batch = collator(examples)
    model.eval()
    with torch.no_grad():
        generated = model.generate(
            input_ids=batch["input_ids"].to(model.device),
            attention_mask=batch["attention_mask"].to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    labels = batch["labels"].masked_fill(batch["labels"] == -100, tokenizer.pad_token_id)
    decode = tokenizer.batch_decode
    return [
        {"input": source, "reference": reference, "generated": output}
        for source, reference, output in zip(
            decode(batch["input_ids"], skip_special_tokens=False),
            decode(labels, skip_special_tokens=False),
            decode(generated, skip_special_tokens=False),
            strict=True,
        )
    ]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    training_args = training_arguments(args)
    world = log_world(training_args, args.output_dir)
    set_seed(args.seed)

    with training_args.main_process_first(desc="preparing data"):
        raw, task = raw_datasets(args)
        tokenizer = load_tokenizer(args, raw)
        tokenized = tokenized_datasets(args, raw, task, tokenizer)
    train_dataset, eval_dataset = tokenized["train"], tokenized["validation"]
    if args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(args.max_train_samples, len(train_dataset))))
    if args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(args.max_eval_samples, len(eval_dataset))))
    if len(train_dataset) == 0 or len(eval_dataset) == 0:
        raise ValueError("the data is too small for one training and one validation example")
    model = load_model(args, tokenizer)
    collator = collator_for(args, task, tokenizer, model)

    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
    )
    # first in the callback list, so the reporting integrations (TensorBoard, ...) get its metrics in the same step
    LoadBalanceCallback().attach_to(trainer)
    print_short_logs(trainer)  # per-layer, per-expert metrics go to metrics.json, not into every printed line
    train_result = trainer.train()
    eval_metrics = trainer.evaluate()
    # the language model's own perplexity per target token, without the router losses that eval_loss includes
    # (span corruption: over fresh noise, the collator draws it)
    eval_perplexity = perplexity(model, eval_dataset, batch_size=args.batch_size, data_collator=collator)
    samples = generate_samples(
        model,
        tokenizer,
        collator,
        [eval_dataset[i] for i in range(min(args.num_samples, len(eval_dataset)))],
        args.max_new_tokens,
    )

    metrics = {
        "task": task,
        "train_loss": train_result.training_loss,
        "eval_loss": eval_metrics["eval_loss"],
        "perplexity": eval_perplexity,
        "train_samples": len(train_dataset),
        "eval_samples": len(eval_dataset),
        "world_size": world["world_size"],
        "parameters": model.config.parameter_counts(),
        "samples": samples,
        "moe_metrics": moe_metrics(trainer.state.log_history),
        "log_history": trainer.state.log_history,
    }
    model_dir = args.output_dir / "model"
    trainer.save_model(str(model_dir))
    if trainer.is_world_process_zero():
        report = getattr(model, "moefy_report", None)
        if report is not None:
            report.save(model_dir)
        write_json(args.output_dir / "metrics.json", metrics)
        summary = f"eval loss {metrics['eval_loss']:.4f}, perplexity {eval_perplexity:.2f}"
        print(f"{task}: {summary}; saved to {args.output_dir}")
        for sample in samples:
            print(f"  input:     {sample['input'][:200]!r}\n  reference: {sample['reference'][:200]!r}")
            print(f"  generated: {sample['generated'][:200]!r}")
    return metrics


if __name__ == "__main__":
    main()
    shut_down_distributed()
