"""Write a converted model folder atomically: everything goes to a temporary sibling folder, renamed at the end.

A failure midway (disk full, Ctrl-C, a bad card) leaves no OUT folder, or the previous OUT intact with --overwrite.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedModel

__all__ = ["TOKENIZER_FILES", "save_converted"]

# what a tokenizer folder may hold (GPT-2 BPE, T5 SentencePiece, fast tokenizers)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
)


def save_converted(
    model: PreTrainedModel,
    out_dir: str | Path,
    *,
    source: str | Path | None = None,
    tokenizer=None,
    overwrite: bool = False,
    write_extras: Callable[[Path], None] | None = None,
) -> Path:
    """Save `model` (safetensors, config, generation config, modeling code), its tokenizer (the `tokenizer` object,
    else the tokenizer files of a `source` folder), its `moefy_report` and whatever `write_extras(folder)` adds
    (e.g. a model card) into `out_dir`, atomically. Refuses a non-empty `out_dir` unless `overwrite`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (CLI: --overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # a sibling temp folder: same file system, so the final rename is atomic
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        elif source is not None and Path(source).is_dir():
            for name in TOKENIZER_FILES:
                if (Path(source) / name).is_file():
                    shutil.copy2(Path(source) / name, staging / name)
        report = getattr(model, "moefy_report", None)
        if report is not None:
            report.save(staging)
        if write_extras is not None:
            write_extras(staging)
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replace(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    # keep the old folder until the new one is in place
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    retired.rmdir()
    out.rename(retired)
    try:
        staging.rename(out)
    except BaseException:
        retired.rename(out)
        raise
    shutil.rmtree(retired, ignore_errors=True)
