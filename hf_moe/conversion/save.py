"""Write a converted model folder atomically: everything goes to a temporary sibling folder, renamed at the end.

A failure midway (disk full, Ctrl-C, a bad card) leaves no OUT folder, or the previous OUT intact with --overwrite;
parent folders created for OUT are removed again. Ctrl-C is held back (not lost) during the few steps that must not be
split: creating the temp folder, the final renames and the clean-up, so that no interruption point leaves a partial
folder behind.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterator
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
    (e.g. a model card) into `out_dir`, atomically. Refuses a non-empty `out_dir` unless `overwrite`.

    The folder gets the permissions `save_pretrained` would give it (0o777 minus the umask), and its files 0o666 minus
    the umask (the weights too, which transformers writes as 0o600). A KeyboardInterrupt that arrives once the folder
    is in place says so in its message (f"{out_dir} was written"); any earlier one leaves nothing behind."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (CLI: --overwrite) to replace it")
    created_parents = [parent for parent in reversed(out.parents) if not parent.exists()]
    staging: Path | None = None
    written = False
    try:
        with _sigint_held():  # a folder made but not yet named in `staging` could not be cleaned up
            out.parent.mkdir(parents=True, exist_ok=True)
            # a sibling temp folder: same file system, so the final rename is atomic
            staging = _new_sibling(out, "partial")
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
        _umask_permissions(staging)
        with _sigint_held():  # the old OUT out of the way and the new one not yet in place: not a moment to stop
            _replace(staging, out)
            written = True
    except BaseException as error:
        if written and isinstance(error, KeyboardInterrupt):  # held during the renames, or just after them
            raise KeyboardInterrupt(f"{out} was written") from None
        with _sigint_held():  # a second Ctrl-C must not cut the clean-up short
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            for parent in reversed(created_parents):
                with contextlib.suppress(OSError):  # not empty: something else is written there now
                    parent.rmdir()
        raise
    return out


def _new_sibling(out: Path, kind: str) -> Path:
    # os.mkdir's mode is filtered by the umask, as for every folder save_pretrained makes; tempfile.mkdtemp would force
    # 0o700 and leave the model folder unreadable to the group and others
    while True:
        candidate = out.parent / f".{out.name}.{kind}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return candidate


def _umask_permissions(folder: Path) -> None:
    # transformers 5 writes model.safetensors through a private temp file (0o600), so the weights of an otherwise
    # readable folder would be the owner's only; give every file what `open` gives (0o666 minus the umask), read off
    # the folder's own mode (made 0o777 minus the umask) rather than os.umask(), which can only be read by changing it
    folder_mode = stat.S_IMODE(folder.stat().st_mode)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(folder_mode if path.is_dir() else folder_mode & 0o666)


def _replace(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    # keep the old folder until the new one is in place
    retired = _new_sibling(out, "old")
    retired.rmdir()  # only its free name is needed: OUT is renamed to it
    out.rename(retired)
    try:
        staging.rename(out)
    except BaseException:
        retired.rename(out)
        raise
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, then raise the KeyboardInterrupt at its end.

    Only the main thread may install a signal handler, and a program that installed its own owns SIGINT: then the
    block runs unprotected. An error inside the block wins over a held Ctrl-C (it propagates either way)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt
