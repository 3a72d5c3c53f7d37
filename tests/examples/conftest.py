"""Helpers for the example smoke tests: import an example script as a module and call its `main(argv)`."""

from __future__ import annotations

import importlib
import sys
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
