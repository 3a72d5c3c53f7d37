"""Helpers for the example smoke tests: import an example script as a module and call its `main(argv)`."""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def example(monkeypatch):
    """`example("run_clm_moe")` imports examples/run_clm_moe.py (and lets it import its sibling helpers)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name: str):
        module = sys.modules.get(name) or importlib.import_module(name)
        assert Path(module.__file__).parent == EXAMPLES, module.__file__
        return module

    return load


# the warnings the main paths used to print, each fixed at its source or filtered narrowly where it is not ours
SPURIOUS = (
    "was set in the config but it is unrecognized",  # transformers' loss_type fallback (dense GPT2LMHeadModel)
    "`is_gradient_checkpointing` is deprecated",  # PEFT reading a deprecated transformers property
    "While redistributing from",  # DTensor's sequential-collective hint on every expert-parallel rank
)


class _Emitted(logging.Handler):
    """Logged warnings (as a logging handler) and Python warnings (`caught`, filled by `catch_warnings`)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []
        self.caught: list[warnings.WarningMessage] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def spurious(self) -> list[str]:
        everything = self.messages + [str(warning.message) for warning in self.caught]
        return [message for message in everything if any(pattern in message for pattern in SPURIOUS)]


@pytest.fixture
def emitted():
    """Everything warned while the test runs: Python warnings and transformers' / DTensor's logged warnings.

    transformers' logger does not propagate to the root logger (so caplog misses it) and logs a `warning_once` message
    once per process (so an earlier test could hide it): a handler goes on its library logger and the once-cache is
    cleared first. `emitted.spurious()` lists the messages matching `SPURIOUS`.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.warning_once.cache_clear()
    emitted = _Emitted()
    transformers_logging.add_handler(emitted)
    torch_logger = logging.getLogger("torch.distributed.tensor._redistribute")
    torch_logger.addHandler(emitted)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            emitted.caught = caught
            yield emitted
    finally:
        transformers_logging.remove_handler(emitted)
        torch_logger.removeHandler(emitted)
