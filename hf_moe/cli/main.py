"""`hf-moe` entry point: dispatches to the subcommand modules."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

from . import demo, inspect, moefy

SUBCOMMANDS = {"moefy": moefy, "inspect": inspect, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-moe", description="Mixture-of-Experts for Hugging Face Transformers (GPT-2 and T5)."
    )
    parser.add_argument("--version", action="version", version=importlib.metadata.version("hf-moe"))
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        module.add_parser(subparsers, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileExistsError, FileNotFoundError, TypeError) as error:
        print(f"hf-moe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
