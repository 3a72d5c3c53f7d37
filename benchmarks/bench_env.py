"""Helpers the benchmark scripts share: the machine and versions a result was measured on, and atomic writes of the
results. The scripts import it as a sibling module (`python benchmarks/x.py` puts `benchmarks/` on `sys.path`)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import hf_moe

__all__ = [
    "environment",
    "in_subprocess",
    "peak_resident_mib",
    "resident_mib",
    "restart_peak_resident",
    "write_atomically",
]


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


def in_subprocess(script: str, request: dict) -> dict:
    """Run `python script --worker JSON(request)` in a fresh process and return the JSON its last stdout line holds:
    one model per process, so no model's memory, caches or allocator state helps or hides another's."""
    completed = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(request)], capture_output=True, text=True, check=False
    )
    if completed.returncode:
        raise RuntimeError(f"the worker {request} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# Peak memory of a stretch of a process: Linux's VmHWM (peak resident set of this process image), restarted by
# writing "5" to /proc/self/clear_refs. Not `getrusage().ru_maxrss`: Linux carries that over from the parent across
# fork + exec, so a worker started by a benchmark that had held 9 GiB reported 9 GiB.


def resident_mib() -> float:
    return _status_mib("VmRSS")


def peak_resident_mib() -> float:
    return _status_mib("VmHWM")


def restart_peak_resident() -> None:
    """From here on `peak_resident_mib()` is the peak since this call."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**10  # kB
    raise RuntimeError(f"/proc/self/status has no {field} (peak memory is measured on Linux only)")
