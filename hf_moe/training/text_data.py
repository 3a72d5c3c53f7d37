"""Text to train a small language model on, offline: a corpus every machine has and a tokenizer trained on the fly.

The corpus is the Python standard library's source: every machine with Python has it, so the demo, the examples and
a user's first experiment run without any download. It is read in a fixed order (sorted paths, test packages left
out), so it is the same text on every machine with the same Python version. The tokenizer is a byte-level BPE (GPT-2's
scheme: every byte is in the alphabet, so no text is ever unknown) trained on that text in seconds; a small vocabulary
keeps the embedding matrix, and so a CPU run, small.

`hf-moe demo` reads documents into memory (`read_corpus`, `split_documents`); the `datasets`-based examples take files
(`default_text_files`). Both split by document, the same way, so no text is in both splits.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "default_text_files",
    "read_corpus",
    "read_texts",
    "split_documents",
    "stdlib_source_files",
    "train_bpe_tokenizer",
]


def stdlib_source_files() -> list[Path]:
    """The `.py` files of this Python's standard library, sorted, without test packages and site-packages."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py") if not {"test", "tests", "site-packages"} & set(p.parts))


def read_texts(files: Iterable[str | Path]) -> Iterator[str]:
    """The files' contents, one file at a time (undecodable bytes replaced): a tokenizer trainer's input."""
    for path in files:
        yield Path(path).read_text(encoding="utf-8", errors="replace")


def read_corpus(files: Sequence[str | Path] | None = None, max_chars: int | None = None) -> list[str]:
    """Documents, one per file, in order, until at least `max_chars` characters are read (the file that crosses the
    limit is kept whole, so documents are never cut). `files=None`: the standard library's source.

    Raises `FileNotFoundError` naming the missing files and `ValueError` for an empty corpus.
    """
    if files is None:
        files = stdlib_source_files()
    else:
        missing = [str(path) for path in files if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"text files not found: {', '.join(missing)}")
    documents, size = [], 0
    for text in read_texts(files):
        documents.append(text)
        size += len(text)
        if max_chars is not None and size >= max_chars:
            break
    if size == 0:
        raise ValueError("the corpus is empty")
    return documents


def split_documents(documents: Sequence[str], validation_every: int = 20) -> tuple[list[str], list[str]]:
    """(train, validation): every `validation_every`-th document is validation, so no document is in both."""
    if validation_every < 2:
        raise ValueError(f"validation_every must be at least 2 (one validation document in N), got {validation_every}")
    train, validation = [], []
    for index, text in enumerate(documents):
        (validation if index % validation_every == validation_every - 1 else train).append(text)
    return train, validation


def default_text_files(folder: str | Path, corpus_bytes: int, validation_every: int = 20) -> tuple[Path, Path]:
    """Write `train.txt` and `validation.txt` into `folder` from the standard library's source; return their paths.

    `corpus_bytes` is the size to read, counted in characters (the source is nearly all ASCII). Files already there
    (from another data-parallel rank or an earlier run) are reused. A corpus too small for a validation document holds
    out its last one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_path, validation_path = folder / "train.txt", folder / "validation.txt"
    if train_path.is_file() and validation_path.is_file():
        return train_path, validation_path
    train, validation = split_documents(read_corpus(max_chars=corpus_bytes), validation_every)
    if not validation:
        validation.append(train.pop())
    # written to temp names then renamed: a rank that sees the files sees them whole
    for path, texts in ((train_path, train), (validation_path, validation)):
        partial = path.with_suffix(f".partial-{os.getpid()}")
        partial.write_text("\n".join(texts), encoding="utf-8")
        partial.replace(path)
    return train_path, validation_path


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str], **named_special_tokens: str
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme) trained on `texts`, as a transformers tokenizer.

    `special_tokens` get the first ids, in order; `named_special_tokens` gives them their roles, e.g.
    `eos_token="</s>"`, `additional_special_tokens=[...]`. Pairs occurring once are not merged (`min_frequency=2`).
    """
    # imported here: `import hf_moe` should not pay for the tokenizer machinery
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
