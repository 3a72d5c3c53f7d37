"""Helpers the benchmark scripts share: the machine and versions a result was measured on, and atomic writes of the
results. The scripts import it as a sibling module (`python benchmarks/x.py` puts `benchmarks/` on `sys.path`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

import hf_moe

__all__ = [
    "environment",
    "in_subprocess",
    "markdown_table",
    "peak_resident_mib",
    "resident_mib",
    "restart_peak_resident",
    "write_atomically",
    "WholeModelSettings",
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


# ------------------------------------------------------------------ whole-model benchmarks (generate.py, train_step.py)


@dataclass
class WholeModelSettings:
    """What both whole-model benchmarks share: a GPT-2-small-shaped model of 2 layers, its MoE (E experts of width F,
    top-K in every layer), and where the workers run. Each script's `Settings` adds its workload."""

    n_layer: int = 2
    n_embd: int = 768
    n_head: int = 12
    ffn: int = 3072  # F
    num_experts: int = 8  # E
    top_k: int = 2  # K
    vocab_size: int = 50257
    device: str = "cpu"
    threads: int | None = None  # torch threads in each worker (None: torch's default)


def gpt2_variants(implementations) -> list[str]:
    """The whole-model variants: a dense GPT-2 with FFN width F, one with K*F (the MoE's active FLOPs per token), and
    the GPT-2 MoE once per experts implementation."""
    return ["dense", "dense K*F", *(f"moe {implementation}" for implementation in implementations)]


def build_gpt2_variant(variant: str, settings, **shape):
    """The `gpt2_variants` model `variant`, seeded, on `settings.device`: `settings` gives F (`ffn`), E
    (`num_experts`) and K (`top_k`), `shape` the GPT-2 config fields every variant shares."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_moe import GPT2MoeConfig, GPT2MoeForCausalLM

    torch.manual_seed(0)
    if variant == "dense":
        model = GPT2LMHeadModel(GPT2Config(n_inner=settings.ffn, **shape))
    elif variant == "dense K*F":
        model = GPT2LMHeadModel(GPT2Config(n_inner=settings.top_k * settings.ffn, **shape))
    else:
        config = GPT2MoeConfig(
            n_inner=settings.ffn, num_experts=settings.num_experts, num_experts_per_tok=settings.top_k, **shape
        )
        model = GPT2MoeForCausalLM(config)
        model.set_experts_implementation(variant.removeprefix("moe "))
    return model.to(settings.device)


def synchronize(device: str) -> None:
    """Wait for the device, so that a clock read after it times the work (a no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def round_robin(script: str, settings, log=print) -> dict[str, list[dict]]:
    """`settings.repeats` rounds, each measuring every variant once in its own `script --worker` process; returns
    each variant's measurements. Round-robin, so a slow spell of the machine lands on every variant alike."""
    names = gpt2_variants(settings.implementations)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(settings.repeats):
        for name in names:
            samples[name].append(in_subprocess(script, {"variant": name, "settings": asdict(settings)}))
        log(f"repeat {repeat + 1}/{settings.repeats} done")
    return samples


def whole_model_parser(description: str, default_json: str, default_repeats: int, default_implementations: str):
    """The options both whole-model benchmarks take; a script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat: every code path in seconds")
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"measurements per variant (default: {default_repeats})"
    )
    parser.add_argument("--implementations", nargs="+", default=None, help=f"default: {default_implementations}")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--json", default=default_json, help="where to save the results")
    return parser


def run_worker(args, measure, settings_class) -> bool:
    """In a `--worker` process: measure the requested variant and print the result as the last stdout line."""
    if not args.worker:
        return False
    request = json.loads(args.worker)
    print(json.dumps(measure(request["variant"], settings_class(**request["settings"]))))
    return True


def settings_from(args, parser, settings_class, quick: dict, **fields):
    """The run's settings: `quick` with --quick, then the common options and `fields`; unknown implementations are
    a parser error naming the allowed ones."""
    from hf_moe.modeling import EXPERTS_IMPLEMENTATIONS

    settings = settings_class(**(quick if args.quick else {}), device=args.device, threads=args.threads, **fields)
    for name in ("repeats", "implementations"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    unknown = sorted(set(settings.implementations) - set(EXPERTS_IMPLEMENTATIONS))
    if unknown:
        parser.error(f"--implementations: unknown {unknown}; choose from {list(EXPERTS_IMPLEMENTATIONS)}")
    return settings


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def finish(result: dict, table: str, json_path: str) -> dict:
    """Print the table and the environment, save the whole result as JSON (atomically); returns the result."""
    print(table)
    print(json.dumps(result["environment"]))
    write_atomically(Path(json_path), json.dumps(result, indent=2))
    return result


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
