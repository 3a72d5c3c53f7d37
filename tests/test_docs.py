"""The code blocks of CONTRIBUTING.md run as written (the README's blocks load Hub checkpoints, so they are covered
by the tests of the functions they call)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hf_moe.modeling.registry import ROUTERS

REPO_ROOT = Path(__file__).resolve().parents[1]


def python_blocks(document: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO_ROOT / document).read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("block", python_blocks("CONTRIBUTING.md"))
def test_contributing_code_blocks_run(block):
    registered = set(ROUTERS)
    try:
        exec(compile(block, "CONTRIBUTING.md", "exec"), {})
    finally:
        for name in set(ROUTERS) - registered:
            del ROUTERS[name]
