"""Helpers the benchmark scripts share: the machine and versions a result was measured on, and atomic writes of the
results. The scripts import it as a sibling module (`python benchmarks/x.py` puts `benchmarks/` on `sys.path`)."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

import torch
import transformers

import hf_moe

__all__ = ["environment", "write_atomically"]


def environment() -> dict:
    """Versions and machine, printed and saved with every result table."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_moe": hf_moe.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def write_atomically(path: Path, text: str) -> None:
    """A temporary file next to `path`, then a rename: an interrupted run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise
