"""`hf-moe` entry point: dispatches to the subcommand modules and turns every bad input into one line on stderr.

Exit codes: 0 done; 2 bad input (usage, arguments, a missing / unreadable / unsupported model, a taken OUT), with one
line `hf-moe COMMAND: error: ...` naming the input and what is allowed; 1 the system failed us (an OSError: disk
full, permissions, network), also one line; 130 interrupted (Ctrl-C, the shell's 128 + SIGINT), one line saying what
was left on disk. Anything else is a bug and keeps its traceback.

Building the parser imports no subcommand: each one's module is imported the first time its parser parses or shows
help, so `hf-moe --help` and a usage error do not wait seconds for torch and transformers.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from collections.abc import Sequence

__all__ = ["SUBCOMMANDS", "ArgumentParser", "HelpFormatter", "UsageError", "build_parser", "main", "parse"]

# name -> (module with `add_parser(subparsers, name)`, summary for `hf-moe --help`); the summary lives here because
# listing the commands must not import them
SUBCOMMANDS = {
    "moefy": ("hf_moe.cli.moefy", "convert a dense GPT-2 / T5 checkpoint into an MoE model folder"),
    "merge": (
        "hf_moe.cli.merge",
        "merge dense models of one architecture into one MoE model folder, one expert each (Branch-Train-MiX)",
    ),
    "inspect": ("hf_moe.cli.inspect", "describe an MoE model folder and check that its weights are readable"),
    "distill": (
        "hf_moe.cli.distill",
        "distill a GPT-2 MoE into a dense model or a Mixture-of-Students on local text, with held-out perplexities",
    ),
    "demo": (
        "hf_moe.cli.demo",
        "pretrain a small GPT-2, moefy it, train both on, compare (offline, a few CPU minutes)",
    ),
}

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

# what a user can cause by what they typed or pointed us at; the message says what is allowed
_BAD_INPUT = (ValueError, TypeError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


class UsageError(Exception):
    """A command line argparse rejected; the message is the whole line to print."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is nothing to show (None, False) or the help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or not _has_default_to_show(action):
            return help_text
        return super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        # argparse prints no help column for an option without help text, so its default would not show either
        if action.help is None and action.option_strings and _has_default_to_show(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def _has_default_to_show(action: argparse.Action) -> bool:
    # identity, not equality: a default of 0 is worth showing, False (a flag's "off") and None ("not given") are not
    return not any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))


class ArgumentParser(argparse.ArgumentParser):
    """Defaults in --help; a usage error is one line (what is wrong, where to read more) instead of usage + error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


class _LazySubcommandParser(ArgumentParser):
    """A subcommand's parser that imports its module, which adds the arguments, the first time it parses or shows help."""

    def __init__(self, *args, module: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._module = module
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            name = self.prog.rsplit(" ", 1)[-1]
            importlib.import_module(self._module).add_parser(_IntoParser(self), name)

    def parse_known_args(self, args=None, namespace=None):
        self._load()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._load()
        return super().format_usage()

    def format_help(self) -> str:
        self._load()
        return super().format_help()


class _IntoParser:
    """Stands in for argparse's subparsers action, so that a module's `add_parser(subparsers, name)` fills the lazy
    parser that already exists instead of making a new one."""

    # ArgumentParser settings that are plain attributes, read when parsing or formatting (others act in __init__)
    _SETTABLE = ("description", "epilog", "usage", "formatter_class", "argument_default", "allow_abbrev")

    def __init__(self, parser: _LazySubcommandParser):
        self._parser = parser

    def add_parser(self, name: str, *, help: str | None = None, **kwargs) -> ArgumentParser:
        # `help` is the line in `hf-moe --help`, which comes from SUBCOMMANDS
        unsupported = set(kwargs) - set(self._SETTABLE)
        if unsupported:
            raise TypeError(f"add_parser({name!r}) got {sorted(unsupported)}; a subcommand may set {self._SETTABLE}")
        for key, value in kwargs.items():
            setattr(self._parser, key, value)
        return self._parser


def build_parser() -> ArgumentParser:
    """The `hf-moe` parser; imports no subcommand module until that subcommand parses or shows its help."""
    parser = ArgumentParser(
        prog="hf-moe", description="Mixture-of-Experts for Hugging Face Transformers (GPT-2 and T5)."
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_LazySubcommandParser
    )
    for name, (module, summary) in SUBCOMMANDS.items():
        subparsers.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".", module=module)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace | int:
    """The parsed command line, or the exit code when parsing alone answers: help and --version (0, printed) or a
    usage error (2, its one line printed)."""
    try:
        args, unknown = build_parser().parse_known_args(argv)
    except UsageError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as done:  # --help, --version
        return done.code if isinstance(done.code, int) else 0
    if unknown:  # argparse would blame the top-level parser; the options were given to the subcommand
        prog = f"hf-moe {args.command}"
        print(f"{prog}: error: unrecognized arguments: {' '.join(unknown)} (see {prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hf-moe` with `argv` (default: the process's arguments); returns the exit code, never calls sys.exit."""
    args = parse(argv)
    if isinstance(args, int):
        return args
    try:
        return args.run(args)
    except KeyboardInterrupt as interrupt:
        # a subcommand that writes says what Ctrl-C left on disk, as the interrupt's text
        note = str(interrupt)
        print(f"hf-moe {args.command}: interrupted" + (f", {note}" if note else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        code = _exit_code(error)
        if code is None:
            raise
        print(f"hf-moe {args.command}: error: {one_line(error)}", file=sys.stderr)
        return code


def one_line(error: BaseException) -> str:
    """The error's message on one line. A config's validator error arrives wrapped by huggingface_hub's strict
    dataclasses ("Class validation error for validator ...:" plus the cause on the next line); the cause is what names
    the field and the value, so it is what is shown."""
    wrapper = _loaded_class("huggingface_hub.errors", "StrictDataclassClassValidationError")
    if wrapper is not None and isinstance(error, wrapper) and error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _exit_code(error: Exception) -> int | None:
    # a config that rejects a value (huggingface_hub's strict dataclasses), a weights file safetensors cannot read:
    # bad input too, though neither is a ValueError
    wrapped = tuple(
        cls
        for cls in (
            _loaded_class("huggingface_hub.errors", "StrictDataclassError"),
            _loaded_class("safetensors", "SafetensorError"),
        )
        if cls is not None
    )
    if isinstance(error, _BAD_INPUT + wrapped):
        return EXIT_USAGE
    if isinstance(error, OSError):
        return EXIT_FAILURE
    return None


def _loaded_class(module: str, name: str) -> type | None:
    # an error can only be of a class whose module is loaded; importing one just to classify an error is waste
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("hf-moe")


if __name__ == "__main__":
    sys.exit(main())
