"""The settings of `hf-moe demo` (`hf_moe.demo.run_demo`), apart from the demo itself: the CLI reads the defaults to
show them in `--help`, and must not import torch for that."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DemoSettings"]


@dataclass
class DemoSettings:
    output_dir: Path = Path("outputs/demo")
    text_files: list[Path] | None = None  # default: the Python standard library's source files
    model: str | None = None  # a dense GPT-2 folder or Hub id to start from instead of pretraining one
    corpus_bytes: int = 1_500_000  # characters of text to read (the stdlib source is nearly all ASCII)
    vocab_size: int = 2048
    block_size: int = 128
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    batch_size: int = 16
    pretrain_steps: int = 300
    steps: int = 300
    learning_rate: float = 1e-3
    eval_every: int = 50
    num_experts: int = 8
    top_k: int = 2
    init: str = "copy"
    seed: int = 0  # model init and data order of the pretraining; the comparison's seed unless `seeds` is set
    seeds: list[int] | None = None  # repeat the comparison (router init, data order) once per seed
