"""Text a conversion reads (a hash corpus, calibration text): checked before any slow work, read lazily.

A text source is a `datasets.Dataset` / `IterableDataset` (its `text_column`), or an iterable whose items are texts
(`str`) or text files (`pathlib.Path` / `os.PathLike`, read as UTF-8). A file name must be a `Path`: a `str` is
always text (a short `str` that names an existing file gets a warning, since that is rarely what was meant). Files
are read in pieces of about `FILE_PIECE_CHARS` characters cut at line ends, so memory stays bounded for any file and
no word is cut in two.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["FILE_PIECE_CHARS", "check_text_source", "count_texts", "iter_texts"]

FILE_PIECE_CHARS = 1 << 16


def check_text_source(source, argument: str, text_column: str = "text"):
    """`source` ready for `iter_texts` (a lone Path becomes a list), or the error that names `argument`: TypeError
    for a wrong kind (a lone str, a DatasetDict, items neither str nor Path), ValueError for a missing column,
    FileNotFoundError for missing files (all of them named, before any is read)."""
    if isinstance(source, (str, bytes)):
        raise TypeError(
            f"{argument} must be a list of texts, a list of pathlib.Path files or a datasets.Dataset, not a single "
            "string (wrap one text in a list, or pass [Path(file)] for a file)"
        )
    if isinstance(source, os.PathLike):
        source = [source]
    datasets = sys.modules.get("datasets")  # an object can only be a Dataset if datasets is imported
    if datasets is not None and isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(f"{argument} is a DatasetDict with splits {list(source)}; pass one split, e.g. ['train']")
    if datasets is not None and isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        if text_column not in (source.column_names or []):
            raise ValueError(f"{argument} needs a {text_column!r} column; the dataset has {source.column_names}")
        return source
    if not isinstance(source, Iterable):
        raise TypeError(
            f"{argument} must be an iterable of texts (str) or pathlib.Path files, or a datasets.Dataset; got "
            f"{type(source).__name__}"
        )
    if isinstance(source, (list, tuple)):  # a generator is checked item by item as it is read
        wrong = [type(item).__name__ for item in source if not isinstance(item, (str, os.PathLike))]
        if wrong:
            raise TypeError(f"{argument} items must be texts (str) or files (pathlib.Path), got a {wrong[0]}")
        missing = [str(item) for item in source if isinstance(item, os.PathLike) and not _path(item).is_file()]
        if missing:
            raise FileNotFoundError(f"{argument} files not found: {', '.join(missing)}")
    return source


def iter_texts(source, argument: str, text_column: str = "text") -> Iterator[str]:
    """The texts of a checked source, in order: a Dataset's `text_column`, texts as they are, files in pieces."""
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        for row in source:
            yield row[text_column]
        return
    warned = False
    for item in source:
        if isinstance(item, os.PathLike):
            yield from _file_pieces(_path(item), argument)
        elif isinstance(item, str):
            if not warned and "\n" not in item and len(item) < 4096 and os.path.isfile(item):
                warned = True
                warnings.warn(
                    f"{argument} reads {item!r} as text, not as the file of that name; pass pathlib.Path({item!r}) "
                    "to read the file",
                    UserWarning,
                    stacklevel=3,
                )
            yield item
        else:
            raise TypeError(f"{argument} items must be texts (str) or files (pathlib.Path), got {type(item).__name__}")


def count_texts(source) -> int | None:
    """How many texts `iter_texts` yields, where that is known without reading (a Dataset's rows, a list of texts;
    files yield pieces, a generator is unknown): a progress bar's total."""
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(source, datasets.Dataset):
        return len(source)
    if isinstance(source, (list, tuple)) and all(isinstance(item, str) for item in source):
        return len(source)
    return None


def _path(item: os.PathLike) -> Path:
    return Path(item).expanduser()


def _file_pieces(path: Path, argument: str) -> Iterator[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{argument} file not found: {path}")
    with path.open(encoding="utf-8", errors="replace") as file:
        while piece := file.read(FILE_PIECE_CHARS):
            yield piece + file.readline()  # finish the line: no word cut in two
