"""Run the code of a documentation page as a reader would."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_page(name: str, blocks: int, after_each: Callable[[dict], None] | None = None) -> dict:
    """Execute the ```python blocks of the markdown page ``name`` (relative to the repository root;
    it must hold ``blocks`` of them) in order, in one namespace, calling ``after_each(namespace)``
    after each block; return the namespace."""
    page = ROOT / name
    code_blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert len(code_blocks) == blocks, f"{name} has {len(code_blocks)} python blocks, expected {blocks}"
    scope: dict = {}
    for code in code_blocks:
        exec(compile(code, str(page), "exec"), scope)
        if after_each is not None:
            after_each(scope)
    return scope
