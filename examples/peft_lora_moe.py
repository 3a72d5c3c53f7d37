"""LoRA on a GPT-2 or T5 Mixture-of-Experts model with PEFT: attention layers and the 3D expert weights.

The experts of an hf_moe model are 3D parameters (one matrix per expert) inside one module, not E `nn.Linear`s, so
PEFT reaches them with `LoraConfig(target_parameters=[...])` (one LoRA per expert, stacked), while attention
projections are ordinary modules for `target_modules`. PEFT 0.21 cannot put both in one adapter in every case, so
this script trains two adapters side by side, both active:

  "attention"  target_modules: GPT-2 `c_attn` (a `Conv1D`, hence fan_in_fan_out=True) or T5 `q`, `v`;
               LoRA dropout allowed
  "experts"    target_parameters: `experts.up_proj`/`gate_up_proj` and `experts.down_proj`; no LoRA dropout
               (PEFT raises for dropout, fan_in_fan_out, lora_bias or DoRA on parameter targets)

Then it saves the adapters, reloads them onto a fresh copy of the base model, checks the logits, merges them into the
base weights (`merge_and_unload`), checks the logits again, and saves the merged model, which loads with plain
`AutoModelFor...` and no PEFT. `metrics.json` records the losses, parameter counts and the logit differences.

The base is `--model` (a GPT-2 MoE or T5 MoE folder, e.g. the output of run_clm_moe.py) or a small dense model of
`--family` upcycled with moefy and saved first to OUTPUT_DIR/base. Training text is `--text-file` or the Python
standard library's source: language modeling for GPT-2, span corruption (run_seq2seq_moe.py's collator) for T5.

    python examples/peft_lora_moe.py --family gpt2 --output-dir outputs/lora_gpt2_moe
    python examples/peft_lora_moe.py --family t5 --output-dir outputs/lora_t5_moe
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from itertools import chain
from pathlib import Path

import torch
from moe_example_utils import load_text_datasets, write_json
from peft import LoraConfig, PeftModel, get_peft_model
from run_seq2seq_moe import SpanCorruptionCollator, sentinel_ids
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_moe.conversion import moefy  # importing hf_moe registers the MoE families with the Auto classes
from hf_moe.training import default_text_files, read_texts, train_bpe_tokenizer

# attention modules LoRA targets by default: GPT-2's fused q/k/v projection, T5's query and value projections
ATTENTION_MODULES = {"gpt2": ["c_attn"], "t5": ["q", "v"]}
AUTO_CLASSES = {"gpt2": AutoModelForCausalLM, "t5": AutoModelForSeq2SeqLM}
GPT2_EOS = "<|endoftext|>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["gpt2", "t5"], default="gpt2", help="model family of a new base model")
    parser.add_argument("--model", help="GPT-2 MoE or T5 MoE folder to adapt (its family wins); default: a new one")
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=["attention", "experts"],
        default=["attention", "experts"],
        help="what LoRA adapts: one adapter per choice",
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (per expert for the experts adapter)")
    parser.add_argument("--alpha", type=int, default=16, help="LoRA alpha (scaling alpha / r)")
    parser.add_argument(
        "--lora-dropout", type=float, default=0.05, help="LoRA dropout of the attention adapter (experts: always 0)"
    )
    parser.add_argument("--text-file", type=Path, nargs="+", help="training text; default: stdlib source")
    parser.add_argument("--corpus-bytes", type=int, default=500_000, help="size of the default stdlib corpus")
    parser.add_argument("--vocab-size", type=int, default=2048, help="vocabulary of a new base model's BPE")
    parser.add_argument("--block-size", type=int, default=64, help="tokens per training sequence")
    parser.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--logging-steps", type=int, default=20, help="log the loss every N steps")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("outputs/lora_moe"), help="base, adapters, merged, metrics"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the base model, LoRA init and data order")
    return parser.parse_args(argv)


# --- base model ------------------------------------------------------------------------------------------------


def family_of(model_path: str) -> str:
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model_path).model_type
    families = {"gpt2_moe": "gpt2", "t5_moe": "t5"}
    if model_type not in families:
        raise ValueError(f"--model must be a GPT-2 MoE or T5 MoE folder; {model_path} has model_type {model_type!r}")
    return families[model_type]


def new_tokenizer(family: str, texts, vocab_size: int):
    if family == "gpt2":
        return train_bpe_tokenizer(texts, vocab_size, [GPT2_EOS], eos_token=GPT2_EOS, pad_token=GPT2_EOS)
    sentinels = [f"<extra_id_{i}>" for i in range(16)]
    return train_bpe_tokenizer(
        texts,
        vocab_size,
        ["<pad>", "</s>", "<unk>", *sentinels],
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=sentinels,
    )


def new_base_model(family: str, tokenizer, block_size: int) -> PreTrainedModel:
    """A small dense model of the family, upcycled with `moefy` (copy init): the path from a pretrained dense
    checkpoint, which is where LoRA fine-tuning usually starts (no pretrained weights are downloaded here).
    Sizes are multiples of 4 (grouped_mm on CPU needs 16-byte strides)."""
    if family == "gpt2":
        dense = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(tokenizer),
                n_positions=block_size,
                n_embd=64,
                n_layer=2,
                n_head=4,
                bos_token_id=tokenizer.eos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    else:
        dense = T5ForConditionalGeneration(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=64,
                d_ff=128,
                d_kv=16,
                num_heads=4,
                num_layers=2,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
    return moefy(dense, num_experts=4, top_k=2, init="copy")


def base_model_folder(args: argparse.Namespace, text_files: list[Path]) -> tuple[Path, str]:
    """The folder of the base model and its family: `--model`, or a new model saved to OUTPUT_DIR/base (reloading
    the adapters later needs the base weights on disk, as a user's would be)."""
    if args.model is not None:
        return Path(args.model), family_of(args.model)
    folder = args.output_dir / "base"
    tokenizer = new_tokenizer(args.family, read_texts(text_files), args.vocab_size)
    model = new_base_model(args.family, tokenizer, args.block_size)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, args.family


# --- LoRA ------------------------------------------------------------------------------------------------------


def expert_parameter_targets(model: PreTrainedModel) -> list[str]:
    """`target_parameters` for the experts: the 3D weights, named by their last two path parts
    (e.g. "experts.up_proj"); PEFT matches them as suffixes in every layer. Biases are left out: PEFT would treat an
    (E, F) bias table as one matrix, which is not a per-expert LoRA."""
    names = {".".join(name.split(".")[-2:]) for name, param in model.named_parameters() if param.ndim == 3}
    if not names:
        raise ValueError(f"{type(model).__name__} has no 3D expert weights to target")
    return sorted(names)


def lora_configs(args: argparse.Namespace, family: str, model: PreTrainedModel) -> dict[str, LoraConfig]:
    """One LoRA config per target group.

    Why two adapters rather than one: a `target_parameters` adapter is a `lora.ParamWrapper`, which raises for
    `lora_dropout != 0` and for `fan_in_fan_out=True`; GPT-2's `Conv1D` attention needs fan_in_fan_out=True (PEFT
    even turns it on by itself, in the shared config, and then fails on the experts). Separate configs keep dropout
    and the Conv1D layout on attention while the experts get a plain LoRA.
    """
    configs = {}
    if "attention" in args.targets:
        configs["attention"] = LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=args.lora_dropout,
            target_modules=ATTENTION_MODULES[family],
            fan_in_fan_out=family == "gpt2",  # Conv1D stores (in, out)
        )
    if "experts" in args.targets:
        configs["experts"] = LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=0.0,  # PEFT cannot apply dropout to parameter targets
            target_modules=[],  # nothing by module name: only the parameters below
            target_parameters=expert_parameter_targets(model),
        )
    return configs


@contextlib.contextmanager
def peft_wraps_quietly():
    """Silence one deprecation that PEFT, not this script, triggers when it wraps a model.

    `PeftModel.__init__` (peft 0.21.2) reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecated in
    favour of `is_activation_checkpointing` (a FutureWarning on every wrap). Avoiding the read would mean shadowing
    transformers' property in our model classes; instead the filter matches that one message, only around PEFT's
    wrapping. Remove it once PEFT reads the new name.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def attach_lora(model: PreTrainedModel, configs: dict[str, LoraConfig]) -> PeftModel:
    """Add every adapter and make all of them active and trainable (PeftModel.set_adapter takes one name; the
    underlying LoraModel takes a list)."""
    names = list(configs)
    with peft_wraps_quietly():
        peft_model = get_peft_model(model, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, configs[name])
    peft_model.base_model.set_adapter(names)
    return peft_model


def load_adapters(base: PreTrainedModel, adapters_dir: Path, names: list[str]) -> PeftModel:
    """Load the adapters `PeftModel.save_pretrained` wrote (one subfolder per named adapter), all active."""
    with peft_wraps_quietly():
        peft_model = PeftModel.from_pretrained(base, adapters_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters_dir / name, adapter_name=name)
    peft_model.base_model.set_adapter(names)
    return peft_model.eval()


# --- data ------------------------------------------------------------------------------------------------------


def training_data(args: argparse.Namespace, family: str, tokenizer, text_files: list[Path]):
    """Blocks of `block_size` tokens: language modeling for GPT-2 (labels = inputs), span corruption for T5."""
    raw = load_text_datasets(text_files, None, validation_percentage=5, seed=args.seed)

    def blocks(batch):
        ids = list(chain(*tokenizer(batch["text"], add_special_tokens=False)["input_ids"]))
        usable = len(ids) // args.block_size * args.block_size
        out = {"input_ids": [ids[start : start + args.block_size] for start in range(0, usable, args.block_size)]}
        if family == "gpt2":
            out["labels"] = [list(block) for block in out["input_ids"]]
        return out

    data = raw.map(blocks, batched=True, remove_columns=["text"], desc="tokenizing")
    if family == "gpt2":
        return data, default_data_collator
    collator = SpanCorruptionCollator(
        sentinel_ids=sentinel_ids(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=args.seed,
    )
    return data, collator


def fixed_batch(family: str, data, collator, size: int = 4) -> dict[str, torch.Tensor]:
    """One validation batch to compare logits on (for T5 with labels, so the decoder has inputs)."""
    batch = collator([data["validation"][i] for i in range(min(size, len(data["validation"])))])
    return {key: value for key, value in batch.items() if family == "t5" or key != "labels"}


@torch.no_grad()
def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**batch).logits


# --- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    text_files = args.text_file
    if text_files is None:
        train_file, _ = default_text_files(args.output_dir / "corpus", args.corpus_bytes)
        text_files = [train_file]
    base_dir, family = base_model_folder(args, text_files)
    auto_class = AUTO_CLASSES[family]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = auto_class.from_pretrained(base_dir)
    data, collator = training_data(args, family, tokenizer, text_files)
    batch = fixed_batch(family, data, collator)
    base_logits = logits(base, batch)

    configs = lora_configs(args, family, base)
    model = attach_lora(base, configs)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"LoRA adapters {list(configs)}: {trainable:,} trainable of {total:,} parameters")

    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        remove_unused_columns=False,  # the span-corruption collator needs "input_ids" as is
        label_names=["labels"],  # a PeftModel's forward hides the label argument from Trainer's signature check
    )
    eval_dataset = data["validation"].select(range(min(64, len(data["validation"]))))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=eval_dataset,
        data_collator=collator,
    )
    train_result = trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    adapter_logits = logits(model, batch)

    # save the adapters (a few hundred KB), reload them onto a fresh base, merge, save the merged model
    adapters_dir = args.output_dir / "adapters"
    model.save_pretrained(adapters_dir)
    reloaded = load_adapters(auto_class.from_pretrained(base_dir), adapters_dir, list(configs))
    reloaded_logits = logits(reloaded, batch)
    merged = reloaded.merge_and_unload()
    merged_logits = logits(merged, batch)
    merged_dir = args.output_dir / "merged"
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    merged_saved_logits = logits(auto_class.from_pretrained(merged_dir), batch)

    metrics = {
        "family": family,
        "adapters": {name: config.to_dict() for name, config in configs.items()},
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_loss": train_result.training_loss,
        "eval_loss": eval_loss,
        # how much the adapters changed the model: if 0, the round-trip checks below would prove nothing
        "max_abs_diff_adapter_vs_base": (adapter_logits - base_logits).abs().max().item(),
        "max_abs_diff_reloaded_vs_adapter": (reloaded_logits - adapter_logits).abs().max().item(),
        "max_abs_diff_merged_vs_adapter": (merged_logits - adapter_logits).abs().max().item(),
        "max_abs_diff_merged_saved_vs_adapter": (merged_saved_logits - adapter_logits).abs().max().item(),
    }
    write_json(args.output_dir / "metrics.json", metrics)
    differences = ", ".join(
        f"{name} {metrics[f'max_abs_diff_{key}']:.3g}"
        for name, key in (
            ("adapters vs base", "adapter_vs_base"),
            ("reloaded", "reloaded_vs_adapter"),
            ("merged", "merged_vs_adapter"),
            ("merged and saved", "merged_saved_vs_adapter"),
        )
    )
    print(f"eval loss {eval_loss:.4f}; max |logit difference|: {differences} (vs the trained adapters)")
    return metrics


if __name__ == "__main__":
    main()
