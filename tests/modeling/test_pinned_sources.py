"""Families as pinned diffs: every transformers method a family restates is pinned to the source it was restated from.

A restated method is marked `@restates("models.gpt2.modeling_gpt2.GPT2Block.forward", "<sha256[:16]>")`. When the
installed transformers changes that method, the hash differs and the test fails naming the method to re-check: read
the new parent source, carry its change into the restatement (or confirm none is needed), then update the hash.
Every other override of a transformers method must extend it (call `super()`), so it follows the parent's changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import types

import pytest
import transformers
from torch import nn

from hf_moe.modeling import _compat, modeling_gpt2_moe, modeling_t5_moe, moe_pretrained

FAMILY_MODULES = [modeling_gpt2_moe, modeling_t5_moe, moe_pretrained, _compat]


def source_hash(function) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def resolve(path: str):
    """`models.gpt2.modeling_gpt2.GPT2Block.forward` -> the function in the installed transformers."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(["transformers", *parts[:split]]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ImportError(path)


def family_classes() -> list[type]:
    classes = []
    for module in FAMILY_MODULES:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                classes.append(cls)
    return classes


def restated_methods() -> list[tuple[str, str, str]]:
    found = []
    for cls in family_classes():
        for name, member in vars(cls).items():
            marker = getattr(member, "__hf_moe_restates__", None)
            if marker is not None:
                found.append((f"{cls.__name__}.{name}", *marker))
    return found


def test_the_families_restate_what_they_say():
    restated = {name for name, _, _ in restated_methods()}
    assert {"GPT2MoeBlock.forward", "GPT2MoeForCausalLM.forward", "T5MoeBlock.forward", "T5MoeStack.__init__"} <= (
        restated
    )


@pytest.mark.parametrize(("method", "parent", "pinned"), restated_methods(), ids=lambda v: str(v))
def test_restated_method_matches_the_installed_parent(method, parent, pinned):
    current = source_hash(resolve(parent))
    assert current == pinned, (
        f"{method} restates transformers' {parent}, whose source changed (transformers {transformers.__version__}: "
        f"{current}, restated from {pinned}). Re-check {method} against the new {parent}, then update its @restates "
        "hash."
    )


def transformers_overrides() -> list[tuple[type, str]]:
    overrides = []
    for cls in family_classes():
        if dataclasses.is_dataclass(cls):  # output classes: their methods are generated
            continue
        parents = [base for base in cls.__mro__[1:] if base.__module__.startswith("transformers.")]
        for name, member in vars(cls).items():
            function = getattr(member, "__func__", member)
            if not isinstance(function, types.FunctionType) or name.startswith("__") and name != "__init__":
                continue
            if any(name in vars(parent) for parent in parents):
                overrides.append((cls, name))
    return overrides


@pytest.mark.parametrize(("cls", "name"), transformers_overrides(), ids=lambda v: getattr(v, "__name__", v))
def test_every_other_override_of_a_transformers_method_extends_it(cls, name):
    member = vars(cls)[name]
    function = getattr(member, "__func__", member)
    if getattr(function, "__hf_moe_restates__", None) is not None:
        return
    source = inspect.getsource(inspect.unwrap(function))
    assert "super()" in source or "super(" in source, (
        f"{cls.__name__}.{name} overrides a transformers method without calling it: mark it @restates(<parent>, "
        "<hash>) so a test notices when transformers changes the parent, or extend the parent with super()"
    )


def test_a_changed_parent_fails_naming_the_method(monkeypatch):
    # the mechanism itself: a parent whose source differs gives another hash
    method, parent, pinned = restated_methods()[0]
    function = resolve(parent)
    changed = "def changed():\n    return 1\n"
    monkeypatch.setattr(inspect, "getsource", lambda target: changed if target is function else "")
    assert source_hash(function) != pinned


def test_modules_are_torch_modules():
    # the scan above covers the family's nn.Module classes
    assert any(issubclass(cls, nn.Module) for cls in family_classes())
