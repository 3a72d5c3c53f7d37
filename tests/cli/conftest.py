"""Tiny model folders for the CLI tests, made once per session and copied into each test's tmp_path."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_moe.cli.main import main

# "moefy:  50%|█████     | 1/2 [00:00<00:00, 9.1layer/s]"
TQDM_BAR = re.compile(r"\| *\d+/\d+ \[")


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    """A dense GPT-2 folder and the MoE folder `hf-moe moefy` makes of it (never modified: tests copy them)."""
    root = tmp_path_factory.mktemp("saved_models")
    torch.manual_seed(0)
    # bos / eos inside the tiny vocabulary, so that transformers has nothing to warn about
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=99, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(root / "dense")
    assert main(["moefy", str(root / "dense"), str(root / "moe"), "--num-experts", "4", "--top-k", "2"]) == 0
    return {"dense": root / "dense", "moe": root / "moe"}


@pytest.fixture
def workspace(tmp_path, saved_models) -> Path:
    """tmp_path holding copies `dense/` and `moe/` of the saved models and a plain file `a_file`."""
    for name, folder in saved_models.items():
        shutil.copytree(folder, tmp_path / name)
    (tmp_path / "a_file").write_text("not a folder\n")
    return tmp_path


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its kind, size, mtime and mode: equal snapshots mean nothing was written."""
    state = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        state[str(path.relative_to(root))] = (path.is_dir(), stat.st_size, stat.st_mtime_ns, stat.st_mode)
    return state


def error_lines(stderr: str) -> list[str]:
    """stderr without progress bars (loading a model draws one before some errors can be seen)."""
    return [line for line in stderr.splitlines() if line.strip() and not TQDM_BAR.search(line)]
