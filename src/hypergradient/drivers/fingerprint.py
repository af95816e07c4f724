"""When two hyper-optimizers (or constraints, or λ0) are the same, for caches and checkpoints.

``optax.adam(0.1)`` written twice gives two objects made of fresh closures: compared by identity
they differ, so a compiled loop keyed on them would be rebuilt at every call. :func:`key` compares
what they compute instead: a function by its code, its defaults and the values its closure holds
(recursively), containers element by element, numbers, strings and arrays by value, a dataclass
(a constraint) by its fields, anything else by its own equality or identity. :func:`digest` is the
same key as a string that is stable across processes, for checkpoint headers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
from typing import Any

import jax
import numpy as np

_MAX_DEPTH = 32  # deeper (or self-referencing) closures fall back to identity


def key(obj: Any) -> Any:
    """A hashable value, equal for two objects that compute the same thing."""
    return _key(obj, 0, stable=False)


def digest(obj: Any) -> str:
    """:func:`key` as a short hex string that is the same in every process."""
    return hashlib.sha256(repr(_key(obj, 0, stable=True)).encode()).hexdigest()[:16]


def _key(obj: Any, depth: int, stable: bool) -> Any:
    def rec(x):
        return _key(x, depth + 1, stable)

    if depth > _MAX_DEPTH:
        return _opaque(obj, stable)
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return (type(obj).__name__, obj)
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        a = np.asarray(obj)
        return ("array", a.dtype.str, a.shape, hashlib.sha256(a.tobytes()).hexdigest())
    if isinstance(obj, (tuple, list)):
        return (type(obj).__qualname__, tuple(rec(x) for x in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((rec(k), rec(v)) for k, v in obj.items()))
    if isinstance(obj, functools.partial):
        return ("partial", rec(obj.func), rec(obj.args), rec(obj.keywords))
    if isinstance(obj, types.CodeType):
        # co_qualname exists from Python 3.11; 3.10 has co_name (the same fingerprints on 3.11+ as before)
        return ("code", getattr(obj, "co_qualname", obj.co_name), obj.co_code, tuple(rec(c) for c in obj.co_consts))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # a constraint, a method: by its fields
        fields = tuple((f.name, rec(getattr(obj, f.name))) for f in dataclasses.fields(obj))
        return ("dataclass", type(obj).__module__, type(obj).__qualname__, fields)
    if isinstance(obj, types.FunctionType):
        cells = tuple(rec(c.cell_contents) if _filled(c) else None for c in obj.__closure__ or ())
        return ("function", rec(obj.__code__), rec(obj.__defaults__), rec(obj.__kwdefaults__), cells)
    return _opaque(obj, stable)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _opaque(obj: Any, stable: bool) -> Any:
    if stable:
        return ("object", type(obj).__module__, type(obj).__qualname__)
    try:
        hash(obj)
    except TypeError:
        return ("id", id(obj))
    return ("object", obj)
