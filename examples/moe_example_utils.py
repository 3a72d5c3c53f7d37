"""Helpers shared by the example scripts: a corpus every machine has, a tokenizer trained on the fly, local text
datasets, the MoE metrics in a Trainer's log history, and small I/O helpers.

The examples import this file as a sibling module (`python examples/run_clm_moe.py` puts `examples/` on `sys.path`),
so each script stays short and the three agree on how data is found and results are written.
"""

from __future__ import annotations

import gc
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast, TrainingArguments

__all__ = [
    "default_text_files",
    "load_pretrained_tokenizer",
    "load_text_datasets",
    "log_world",
    "moe_metrics",
    "read_texts",
    "train_bpe_tokenizer",
    "write_json",
]


def default_text_files(folder: Path, corpus_bytes: int, validation_every: int = 20) -> tuple[Path, Path]:
    """Write a train and a validation text file built from the Python standard library's source.

    Every machine with Python has this text, so the examples run offline without any download. Every
    `validation_every`-th file goes to validation, so no document is in both splits.
    """
    folder.mkdir(parents=True, exist_ok=True)
    train_path, validation_path = folder / "train.txt", folder / "validation.txt"
    if train_path.is_file() and validation_path.is_file():  # another rank (or an earlier run) wrote them
        return train_path, validation_path
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # sorted, tests left out: the same corpus on every machine with this Python version
    files = sorted(p for p in stdlib.rglob("*.py") if not {"test", "tests", "site-packages"} & set(p.parts))
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    size = 0
    for index, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        splits["validation" if index % validation_every == validation_every - 1 else "train"].append(text)
        size += len(text)
        if size >= corpus_bytes:
            break
    if not splits["validation"]:  # a very small corpus: hold out its last file
        splits["validation"].append(splits["train"].pop())
    # written to temp names then renamed: a rank that sees the files sees them whole
    for path, texts in ((train_path, splits["train"]), (validation_path, splits["validation"])):
        partial = path.with_suffix(f".partial-{os.getpid()}")
        partial.write_text("\n".join(texts), encoding="utf-8")
        partial.replace(path)
    return train_path, validation_path


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str], **named_special_tokens: str
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` (seconds on a few MB): no download, and a small vocabulary keeps the
    embedding matrix, and so a CPU run, small. `special_tokens` get the first ids, in order;
    `named_special_tokens` maps roles to them, e.g. eos_token="</s>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # GPT-2's byte-level BPE: every byte is in the alphabet, so no text is ever unknown
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **named_special_tokens)


def load_pretrained_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """`AutoTokenizer.from_pretrained(name)`, or GPT-2's tokenizer for a folder of bare GPT-2 BPE files
    (vocab.json + merges.txt without a tokenizer_config.json, which AutoTokenizer cannot identify)."""
    folder = Path(name)
    if folder.is_dir() and (folder / "merges.txt").is_file() and not (folder / "tokenizer_config.json").is_file():
        return GPT2TokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(name)


def read_texts(files: list[Path]) -> Iterator[str]:
    """The files' contents, one file at a time (a tokenizer trainer's input)."""
    for path in files:
        yield Path(path).read_text(encoding="utf-8", errors="replace")


def load_text_datasets(
    train_files: list[Path],
    validation_file: Path | None,
    validation_percentage: int,
    seed: int,
    keep_linebreaks: bool = True,
) -> DatasetDict:
    """Local text files as a `DatasetDict` with "train" and "validation" splits of one line per row (datasets'
    "text" builder); without a validation file, `validation_percentage` % of the training lines are held out.
    `keep_linebreaks` keeps each line's newline, so concatenated lines are the original text (code needs them)."""
    data_files = {"train": [str(path) for path in train_files]}
    if validation_file is not None:
        data_files["validation"] = [str(validation_file)]
    datasets = load_dataset("text", data_files=data_files, keep_linebreaks=keep_linebreaks)
    if "validation" not in datasets:
        split = datasets["train"].train_test_split(test_size=validation_percentage / 100, seed=seed)
        datasets = DatasetDict(train=split["train"], validation=split["test"])
    return datasets


def moe_metrics(log_history: list[dict]) -> dict[str, float]:
    """The newest value of every `moe/...` (training) and `eval_moe/...` metric `hf_moe.LoadBalanceCallback` put in
    the Trainer's log history."""
    latest: dict[str, float] = {}
    for record in log_history:
        latest.update({key: value for key, value in record.items() if key.startswith(("moe/", "eval_moe/"))})
    return latest


def log_world(args: TrainingArguments, output_dir: Path, **extra) -> dict:
    """Write this process's rank and world size (and `extra`) to `output_dir/world/rank{N}.json`; return them.

    Data parallelism is easy to think one has and not have (e.g. `accelerate launch --cpu` starts one process):
    one file per process proves how many really ran and what they agreed the world size was. Written again at the
    end with each rank's view of the MoE metrics: ranks that logged the same values reduced their counts together.
    """
    info = {
        "rank": args.process_index,
        "local_rank": args.local_process_index,
        "world_size": args.world_size,
        "parallel_mode": str(args.parallel_mode.value),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "pid": os.getpid(),
        **extra,
    }
    write_json(output_dir / "world" / f"rank{args.process_index}.json", info)
    print(
        f"[rank {info['rank']}] world size {info['world_size']} ({info['parallel_mode']}, backend {info['backend']})"
    )
    return info


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON, atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}")
    partial.write_text(json.dumps(data, indent=2, default=str) + "\n")
    partial.replace(path)


def shut_down_distributed() -> None:
    """End a data-parallel run (torchrun / accelerate launch) cleanly; a no-op in a single process.

    Call it after the function that held the model and Trainer has returned. Left to interpreter exit, the process
    group can be destroyed by the last model object while it holds the GIL, which can deadlock or abort against
    gloo's own threads (pytorch/pytorch#56297); destroyed here, after the models are freed, it cannot.
    """
    if not torch.distributed.is_initialized():
        return
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
