"""Time and peak memory of `hf_moe.moefy` on a GPT-2-small-shaped model (124M parameters, random weights).

Each measurement runs in a fresh child process, so its peak resident memory (`ru_maxrss`) belongs to that step alone:

- `build dense`: the dense `GPT2LMHeadModel` only (the baseline the other rows subtract);
- `moefy`: build the dense model, then convert it in memory (`moefy(model, ...)`);
- `moefy from folder + save`: what `hf-moe moefy SRC OUT` does: load a saved dense folder, convert, save atomically.

Memory is reported in copies of the models it must hold at once: moefy needs the dense model and the MoE model
(which is bigger: each MoE layer holds E copies of the FFN), so "peak / (dense + MoE)" near 1 means the conversion
adds no more than small per-layer temporaries; the issue's budget is about two copies.

Run `python benchmarks/moefy_conversion.py --help`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_moe import moefy, save_converted

__all__ = ["main"]

MIB = 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _model_mib(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / MIB


def _dense_model(n_layer: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer)).eval()


def _measure(step: str, n_layer: int, num_experts: int, top_k: int, folder: str, queue) -> None:
    """One child process: run `step`, put (seconds, peak RSS MiB, dense MiB, MoE MiB) on the queue."""
    torch.set_num_threads(torch.get_num_threads())
    started = time.perf_counter()
    dense_mib = moe_mib = 0.0
    if step == "build dense":
        dense_mib = _model_mib(_dense_model(n_layer))
    elif step == "moefy":
        dense = _dense_model(n_layer)
        dense_mib = _model_mib(dense)
        started = time.perf_counter()  # the conversion alone
        moe = moefy(dense, num_experts=num_experts, top_k=top_k)
        moe_mib = _model_mib(moe)
    else:
        moe = moefy(folder, num_experts=num_experts, top_k=top_k)
        moe_mib = _model_mib(moe)
        save_converted(moe, Path(folder).parent / "moe")
    queue.put((time.perf_counter() - started, _peak_rss_mib(), dense_mib, moe_mib))


def _run_in_child(step: str, args: argparse.Namespace, folder: str) -> tuple[float, float, float, float]:
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no memory held from earlier steps
    queue = context.Queue()
    child = context.Process(target=_measure, args=(step, args.n_layer, args.num_experts, args.top_k, folder, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=12, help="GPT-2 layers (12: GPT-2 small, 124M parameters)")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        dense_folder = Path(tmp) / "dense"
        _dense_model(args.n_layer).save_pretrained(dense_folder)
        rows = []
        for step in ("build dense", "moefy", "moefy from folder + save"):
            seconds, peak_mib, dense_mib, moe_mib = _run_in_child(step, args, str(dense_folder))
            rows.append(
                {"step": step, "seconds": seconds, "peak_rss_mib": peak_mib, "dense": dense_mib, "moe": moe_mib}
            )

    baseline_mib = rows[0]["peak_rss_mib"] - rows[0]["dense"]  # interpreter + libraries, no model
    dense_mib = rows[1]["dense"]
    moe_mib = rows[1]["moe"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPT-2 n_layer={args.n_layer} "
        f"({dense_mib:.0f} MiB fp32) -> {args.num_experts} experts top-{args.top_k} on every layer ({moe_mib:.0f} MiB)"
    )
    print("\n| step | seconds | peak RSS MiB | model memory held at peak, in (dense + MoE) copies |")
    print("|---|---|---|---|")
    for row in rows:
        copies = (row["peak_rss_mib"] - baseline_mib) / (dense_mib + moe_mib)
        print(f"| {row['step']} | {row['seconds']:.1f} | {row['peak_rss_mib']:.0f} | {copies:.2f} |")
    return rows


if __name__ == "__main__":
    main()
