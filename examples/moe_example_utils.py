"""Helpers shared by the example scripts only: local text datasets, tokenizers from folders, short log lines, the MoE
metrics in a Trainer's log history, and small I/O and process helpers.

The offline corpus and the tokenizer trained on the fly are part of the package (`hf_moe.training.text_data`: users
who `pip install hf-moe` have them without this folder). The examples import this file as a sibling module
(`python examples/run_clm_moe.py` puts `examples/` on `sys.path`), so each script stays short and they agree on how
data is found and results are written.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoTokenizer,
    GPT2TokenizerFast,
    PreTrainedTokenizerFast,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback

__all__ = [
    "ShortLogPrinter",
    "load_pretrained_tokenizer",
    "load_text_datasets",
    "log_world",
    "moe_metrics",
    "print_short_logs",
    "short_log_line",
    "shut_down_distributed",
    "write_json",
]


def load_pretrained_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """`AutoTokenizer.from_pretrained(name)`, or GPT-2's tokenizer for a folder of bare GPT-2 BPE files
    (vocab.json + merges.txt without a tokenizer_config.json, which AutoTokenizer cannot identify)."""
    folder = Path(name)
    if folder.is_dir() and (folder / "merges.txt").is_file() and not (folder / "tokenizer_config.json").is_file():
        return GPT2TokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(name)


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


# model-wide MoE summaries shown in a log line, with short names; everything else stays in the log history
_MOE_SUMMARY = {
    "load_imbalance": "imbalance",
    "load_imbalance_max": "imbalance_max",
    "cv": "cv",
    "router_entropy": "entropy",
    "dropped_fraction": "dropped",
    "dead_experts": "dead",
    "aux_loss": "aux",
    "z_loss": "z",
}


def short_log_line(logs: dict, step: int) -> str:
    """One Trainer log as one short line: the Trainer's own numbers, then the model-wide MoE summaries.

    With `LoadBalanceCallback` a log holds a value per layer and expert (`moe/layer_03/token_fraction_expert_07`):
    printed whole it is a line of thousands of characters. Those stay in `trainer.state.log_history` (and
    `metrics.json`); the line shows `moe/load_imbalance`, `moe/cv`, ... only.
    """
    plain, moe, moe_prefix = [], [], ""
    for key, value in logs.items():
        if key == "total_flos":  # as Trainer's own printer: a large number nobody reads in a log line
            continue
        prefix, found, name = key.partition("moe/")
        if not found:
            plain.append(f"{key} {_number(value)}")
        elif name in _MOE_SUMMARY:  # "moe/cv" in training logs, "eval_moe/cv" in evaluation logs
            moe.append(f"{_MOE_SUMMARY[name]} {_number(value)}")
            moe_prefix = prefix
    line = f"step {step}: " + ", ".join(plain)
    if moe:
        line += f" | {moe_prefix}moe: " + ", ".join(moe)
    return line


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ShortLogPrinter(TrainerCallback):
    """Prints every Trainer log as a `short_log_line` (main process), in place of Trainer's `PrinterCallback`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(short_log_line(logs, state.global_step))


def print_short_logs(trainer) -> None:
    """Replace the Trainer's log printer (the whole dict per log, with `disable_tqdm=True`) by `ShortLogPrinter`."""
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ShortLogPrinter())


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
