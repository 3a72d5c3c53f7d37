"""The `hf-moe` console script: parses the command line before importing hf_moe, so `--help` answers in a blink.

Importing anything under `hf_moe` first runs `hf_moe/__init__.py`, which registers the model families with
transformers' Auto classes (what `import hf_moe` promises) and so imports torch and transformers: seconds. Parsing
needs none of that: the `hf_moe.cli` modules import only the standard library at import time
(`tests/cli/test_parser.py` keeps them so), so they are loaded under a bare stand-in for the `hf_moe` package, whose
`__init__` does not run. Help, `--version` and usage errors end there. A command line that parses is then run by the
real package, imported afresh.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    answered = _parse_with_a_bare_package(argv)
    if answered is not None:
        return answered
    from hf_moe.cli.main import main as run

    return run(argv)


def _parse_with_a_bare_package(argv: list[str]) -> int | None:
    """The exit code when parsing alone answers (help, version, a usage error); None when the command must run."""
    if any(name == "hf_moe" or name.startswith("hf_moe.") for name in sys.modules):
        return None  # the package is already imported (e.g. called from Python): parse with it
    spec = importlib.util.find_spec("hf_moe")
    sys.modules["hf_moe"] = importlib.util.module_from_spec(spec)  # a package object whose __init__ has not run
    try:
        from hf_moe.cli.main import parse

        parsed = parse(argv)
    finally:
        for name in [name for name in sys.modules if name == "hf_moe" or name.startswith("hf_moe.")]:
            del sys.modules[name]
    return parsed if isinstance(parsed, int) else None


if __name__ == "__main__":
    sys.exit(main())
