"""Fine-tune a GPT-2 Mixture-of-Experts language model on local text files with the Hugging Face `Trainer`.

The model comes from one of three places:
  * `--model DENSE_GPT2`  a dense GPT-2 folder or Hub id, upcycled with `hf_moe.conversion.moefy` (sparse upcycling);
  * `--model MOE_FOLDER`  a GPT-2 MoE folder saved earlier (`model_type` "gpt2_moe"), loaded as is;
  * nothing               a small GPT-2 MoE built from a config (random init).

Data is read with `datasets.load_dataset("text", ...)` from `--train-file`/`--validation-file`; without them the
script writes a corpus from the Python standard library's source, so it runs offline anywhere. Without `--tokenizer`
(or a tokenizer in `--model`) a small byte-level BPE is trained on the training text. Training reports per-layer
router load balance through `hf_moe.LoadBalanceCallback` (summed over data-parallel ranks); the result is the
fine-tuned model, its tokenizer and `metrics.json` (eval loss, perplexity without the router losses, world size,
MoE metrics).

One process:
    python examples/run_clm_moe.py --output-dir outputs/clm_moe
Data-parallel on 2 CPU processes (gloo); `--cpu` would start only one process, see the README:
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        examples/run_clm_moe.py --output-dir outputs/clm_moe_ddp
"""

from __future__ import annotations

import argparse
from itertools import chain
from pathlib import Path

import torch
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
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import hf_moe
from hf_moe import LoadBalanceCallback
from hf_moe.conversion import moefy
from hf_moe.training import default_text_files, perplexity, read_texts, train_bpe_tokenizer

EOS = "<|endoftext|>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model and tokenizer")
    source.add_argument("--model", help="dense GPT-2 (upcycled with moefy) or GPT-2 MoE folder / Hub id; default: new")
    source.add_argument("--tokenizer", help="tokenizer folder / Hub id; default: the model's, else a BPE trained here")
    source.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the BPE trained here")
    source.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer (new model or moefy)")
    source.add_argument("--top-k", type=int, default=2, help="experts per token (new model or moefy)")
    source.add_argument("--init", default="copy", help="moefy init: copy, noise, drop_upcycle or split")
    source.add_argument("--moe-layers", default="all", help="moefy: layers to convert ('all', 'every_other', '0,2')")
    source.add_argument("--n-layer", type=int, default=4, help="new model: transformer blocks")
    source.add_argument("--n-embd", type=int, default=128, help="new model: hidden size")
    source.add_argument("--n-head", type=int, default=4, help="new model: attention heads")

    data = parser.add_argument_group("data")
    data.add_argument("--train-file", type=Path, nargs="+", help="text files to train on; default: stdlib source")
    data.add_argument("--validation-file", type=Path, help="text file to evaluate on; default: held-out lines")
    data.add_argument("--validation-split-percentage", type=int, default=5, help="held out without a validation file")
    data.add_argument("--corpus-bytes", type=int, default=2_000_000, help="size of the default stdlib corpus")
    data.add_argument("--block-size", type=int, default=64, help="tokens per training sequence")
    data.add_argument("--max-train-samples", type=int, help="use at most this many training blocks")
    data.add_argument("--max-eval-samples", type=int, default=100, help="evaluate on at most this many blocks")

    train = parser.add_argument_group("training")
    train.add_argument(
        "--output-dir", type=Path, default=Path("outputs/clm_moe"), help="where the model and metrics go"
    )
    train.add_argument("--max-steps", type=int, default=200, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=8, help="sequences per device per step")
    train.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (cosine schedule)")
    train.add_argument("--logging-steps", type=int, default=25, help="log loss and MoE metrics every N steps")
    train.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps as well (0: only at the end)")
    train.add_argument("--report-to", default="none", help="Trainer integrations, e.g. 'tensorboard' or 'none'")
    train.add_argument("--seed", type=int, default=0, help="seeds model init, data order and the tokenizer corpus")
    return parser.parse_args(argv)


def training_arguments(args: argparse.Namespace) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(args.output_dir / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10),
        weight_decay=0.01,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if args.eval_steps > 0 else "no",
        eval_steps=args.eval_steps or None,
        # experts are 3D parameters and routers see every token: each step uses every parameter, so DDP's extra
        # search for unused ones would only cost time
        ddp_find_unused_parameters=False,
        save_strategy="no",  # the final model is saved below; checkpoints would only cost disk in an example
        report_to=args.report_to,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )


def load_tokenizer(args: argparse.Namespace, train_files: list[Path], training_args: TrainingArguments):
    """The given tokenizer, the model's own, or a byte-level BPE trained on the training text (and saved, so every
    data-parallel rank and the final model folder use the same one)."""
    name = args.tokenizer or (args.model if args.model and _has_tokenizer(args.model) else None)
    if name is not None:
        tokenizer = load_pretrained_tokenizer(name)
    else:
        if args.model is not None:
            raise ValueError(f"{args.model} has no tokenizer files: pass --tokenizer (the model's vocabulary)")
        saved = args.output_dir / "bpe-tokenizer"
        with training_args.main_process_first(desc="training the tokenizer"):
            if not (saved / "tokenizer.json").is_file():
                tokenizer = train_bpe_tokenizer(
                    read_texts(train_files), args.vocab_size, [EOS], bos_token=EOS, eos_token=EOS, unk_token=EOS
                )
                tokenizer.save_pretrained(saved)
            tokenizer = AutoTokenizer.from_pretrained(saved)
    if tokenizer.pad_token is None:  # GPT-2 has none; padding is only used by evaluation batches
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _has_tokenizer(model: str) -> bool:
    folder = Path(model)
    return not folder.is_dir() or any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json"))


def load_model(args: argparse.Namespace, tokenizer) -> PreTrainedModel:
    """Upcycle a dense GPT-2, load a GPT-2 MoE, or build a new small GPT-2 MoE."""
    if args.model is None:
        config = hf_moe.GPT2MoeConfig(
            vocab_size=len(tokenizer),
            n_positions=args.block_size,
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=args.n_head,
            num_experts=args.num_experts,
            num_experts_per_tok=args.top_k,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return hf_moe.GPT2MoeForCausalLM(config)
    model_type = AutoConfig.from_pretrained(args.model).model_type
    if model_type == "gpt2_moe":
        model = AutoModelForCausalLM.from_pretrained(args.model)
    elif model_type == "gpt2":
        model = moefy(
            args.model,
            num_experts=args.num_experts,
            top_k=args.top_k,
            init=args.init,
            moe_layers=args.moe_layers,
            seed=args.seed,
        )
    else:
        raise ValueError(f"--model must be a GPT-2 or GPT-2 MoE model; {args.model} has model_type {model_type!r}")
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
    return model


def lm_datasets(args: argparse.Namespace, tokenizer, train_files, validation_file, training_args: TrainingArguments):
    """Tokenize the text and cut it into `block_size` blocks with labels (run_clm's recipe): no padding, every
    token is a target. Done on the main process first so the other ranks read datasets' cache."""
    with training_args.main_process_first(desc="tokenizing"):
        raw = load_text_datasets(
            train_files, validation_file, args.validation_split_percentage, args.seed, keep_linebreaks=True
        )
        tokenized = raw.map(
            lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"], desc="tokenizing"
        )
        blocks = tokenized.map(lambda batch: _group_texts(batch, args.block_size), batched=True, desc="grouping")
    train, validation = blocks["train"], blocks["validation"]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))
    if len(train) == 0 or len(validation) == 0:
        raise ValueError(f"the text is too small for one training and one validation block of {args.block_size}")
    return train, validation


def _group_texts(batch: dict[str, list], block_size: int) -> dict[str, list]:
    concatenated = {key: list(chain(*batch[key])) for key in batch}
    usable = len(concatenated["input_ids"]) // block_size * block_size  # the tail shorter than a block is dropped
    blocks = {
        key: [values[start : start + block_size] for start in range(0, usable, block_size)]
        for key, values in concatenated.items()
    }
    blocks["labels"] = [list(block) for block in blocks["input_ids"]]  # the model shifts labels itself
    return blocks


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    training_args = training_arguments(args)
    world = log_world(training_args, args.output_dir)
    set_seed(args.seed)

    train_files, validation_file = args.train_file, args.validation_file
    if train_files is None:
        with training_args.main_process_first(desc="writing the default corpus"):
            train_file, validation_file = default_text_files(args.output_dir / "corpus", args.corpus_bytes)
        train_files = [train_file]
    tokenizer = load_tokenizer(args, train_files, training_args)
    model = load_model(args, tokenizer)
    train_dataset, eval_dataset = lm_datasets(args, tokenizer, train_files, validation_file, training_args)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    # first in the callback list, so the reporting integrations (TensorBoard, ...) get its metrics in the same step
    LoadBalanceCallback().attach_to(trainer)
    print_short_logs(trainer)  # per-layer, per-expert metrics go to metrics.json, not into every printed line
    train_result = trainer.train()
    eval_metrics = trainer.evaluate()  # eval_loss includes the router losses; eval_moe/... is the eval pass's balance

    metrics = {
        "train_loss": train_result.training_loss,
        "eval_loss": eval_metrics["eval_loss"],
        "train_samples": len(train_dataset),
        "eval_samples": len(eval_dataset),
        "world_size": world["world_size"],
        "parameters": model.config.parameter_counts(),
        "moe_metrics": moe_metrics(trainer.state.log_history),
        "log_history": trainer.state.log_history,
    }
    # every rank logged the metrics; ranks that agree summed their counts (the accelerate test checks this)
    log_world(training_args, args.output_dir, moe_metrics=metrics["moe_metrics"])
    model_dir = args.output_dir / "model"
    trainer.save_model(str(model_dir))  # main process only; writes the tokenizer and hf_moe's modeling files too
    if trainer.is_world_process_zero():
        # the language model's own perplexity: token-level, without the router losses that eval_loss includes
        metrics["perplexity"] = perplexity(
            model, eval_dataset, batch_size=args.batch_size, data_collator=default_data_collator
        )
        report = getattr(model, "moefy_report", None)
        if report is not None:  # how the MoE was made travels with it
            report.save(model_dir)
        write_json(args.output_dir / "metrics.json", metrics)
        print(
            f"eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['perplexity']:.2f}; saved to {args.output_dir}"
        )
    return metrics


if __name__ == "__main__":
    main()
    shut_down_distributed()
