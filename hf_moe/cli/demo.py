"""`hf-moe demo`: the README's main job (thin over `hf_moe.demo.run_demo`)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from ..demo_settings import DemoSettings

# a smoke-test size: seconds instead of minutes, same code path
QUICK = dict(corpus_bytes=60_000, vocab_size=300, block_size=32, n_layer=2, n_embd=32, n_head=2, batch_size=4)
QUICK.update(pretrain_steps=6, steps=4, eval_every=2, num_experts=4)


def add_parser(subparsers, name: str) -> None:
    defaults = DemoSettings()
    parser = subparsers.add_parser(
        name,
        help="pretrain a small GPT-2, moefy it, train both on, compare (offline, a few CPU minutes)",
        description="The main job end to end and offline: a small dense GPT-2 trained on the Python standard "
        "library's source (or your text files) is upcycled into an MoE; both train on for the same steps; the "
        "validation losses, the load balance, both models with cards and a plot are saved. "
        "With --seeds, the comparison is repeated per seed and the gain's spread reported.",
    )
    parser.add_argument("--output-dir", type=Path, default=defaults.output_dir, help="where everything goes")
    parser.add_argument("--text-files", type=Path, nargs="+", default=None, help="your own corpus (UTF-8 text)")
    parser.add_argument("--model", default=None, help="start from this dense GPT-2 (folder or Hub id)")
    for option in ("corpus_bytes", "vocab_size", "block_size", "n_layer", "n_embd", "n_head", "batch_size"):
        parser.add_argument(f"--{option.replace('_', '-')}", type=int, default=getattr(defaults, option))
    parser.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps after moefy, per model")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--num-experts", type=int, default=defaults.num_experts)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--init", default=defaults.init, help="dense-to-sparse init (hf_moe.conversion.INIT_METHODS)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds the pretraining (and the comparison)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help="repeat the dense-vs-MoE comparison once per seed (router init, data order; the pretrained base is the "
        "--seed one) and report the gain as mean ± std; the first seed's models are saved",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test (seconds)")
    parser.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    values = {f.name: getattr(args, f.name) for f in fields(DemoSettings)}
    if args.quick:
        values.update(QUICK)
    return DemoSettings(**values)


def run(args: argparse.Namespace) -> int:
    from ..conversion import INIT_METHODS
    from ..demo import run_demo

    if args.init not in INIT_METHODS:
        raise ValueError(f"--init must be one of {tuple(INIT_METHODS)}, got {args.init!r}")
    run_demo(settings_from_args(args))
    return 0
