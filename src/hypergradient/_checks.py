"""Argument checks shared by the public constructors and drivers, each raising one clear error."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_int(x: Any) -> bool:
    """An integer (Python or NumPy), and not a bool (``True`` is an ``int`` to Python)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_int(name: str, x: Any, minimum: int = 1) -> int:
    """``int(x)`` when ``x`` is an integer ≥ ``minimum``; otherwise ``ValueError`` naming ``name``."""
    if not is_int(x) or x < minimum:
        kind = "a positive int" if minimum == 1 else "a non-negative int" if minimum == 0 else f"an int ≥ {minimum}"
        raise ValueError(f"{name} must be {kind}, got {x!r}")
    return int(x)
