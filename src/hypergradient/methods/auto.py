"""Auto: the method chosen for a training run and a memory budget.

The candidates for a run of T steps with m hyperparameters and a state of d numbers, and the cost
model that orders them (time as a multiple of one training run, measured on B1):

    candidate                                         exact   time     memory
    Forward()                         (m <= 16)        yes     1 + m    m·d
    Reverse()                                          yes     3        T·d
    Reverse(checkpoint_every=k), k = √T/2, √T, 2√T     yes     4        (T/k + k)·d
    Reverse(checkpoint_every=(k_1, ..., k_L)),         yes     3 + L    ~(L+1)·T^(1/(L+1))·d
        L = 2, 3, k_i = T^((L+1-i)/(L+1))
    Reversible()           (sgd, momentum: ``reversal``) yes    5        d + T·d·(bits lost per step)/32
    Truncated(T/10)                                    no      1.2      T/10·d
    DrMAD()                                            no      3        2d

The memory of a candidate is not modelled: it is XLA's own figure for the candidate's compiled
program (``temp_size_in_bytes``), compiled and never run. The choice is the fastest exact candidate
whose program fits the budget (among equally fast ones, the smallest); inexact candidates are never
chosen, only shown by :func:`hypergradient.plan`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._pytree import partition, signature
from ..errors import MethodError
from .base import Method
from .drmad import DrMAD
from .forward import Forward
from .reverse import Reverse
from .reversible import Reversible
from .truncated import Truncated

#: Forward is a candidate up to this many hyperparameters (its time grows like 1 + m).
FORWARD_MAX_HPARAMS = 16


class Row(NamedTuple):
    """One candidate: the method, whether its hypergradient is exact, its time as a multiple of a
    training run (the cost model), and XLA's temporary bytes and the predicted seconds once known."""

    method: Method
    exact: bool
    cost: float
    bytes: int | None = None
    seconds: float | None = None


def candidates(dyn, lam) -> list[Row]:
    """The methods and settings that can serve ``dyn``, with their cost model (no bytes yet)."""
    steps = dyn.steps
    m = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(lam))
    rows = [Row(Forward(), True, 1.0 + m)] if m <= FORWARD_MAX_HPARAMS else []
    rows.append(Row(Reverse(), True, 3.0))
    for k in sorted({round(f * math.sqrt(steps)) for f in (0.5, 1, 2)}):
        if 2 <= k < steps:
            rows.append(Row(Reverse(checkpoint_every=k), True, 4.0))
    for levels in (2, 3):
        ks = tuple(round(steps ** ((levels + 1 - i) / (levels + 1))) for i in range(1, levels + 1))
        if ks[-1] >= 2 and all(a > b for a, b in zip(ks, ks[1:])):
            rows.append(Row(Reverse(checkpoint_every=ks), True, 3.0 + levels))
    if dyn.optimizer.reversal is not None:
        rows.append(Row(Reversible(), True, 5.0))
    k = max(1, steps // 10)
    rows.append(Row(Truncated(k), False, 1.0 + 2 * k / steps))
    rows.append(Row(DrMAD(), False, 3.0))
    return rows


def temp_bytes(dyn, objective, method: Method, lam) -> int:
    """XLA's peak temporary memory of ``method`` on this run: compiled from the arguments' shapes,
    never run, so λ and the arrays of ``dyn`` may be traced. ``objective(model, λ)`` sees the whole
    model, as a user's does; its arrays are arguments of the program, not constants."""
    arrays, skeleton = partition(objective)

    def program(dyn, arrays, lam):
        return method.value_and_grad(dyn, lambda w, lam: skeleton.combine(arrays)(dyn.model(w), lam), lam)

    def shape(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.core.Tracer) else x

    memory = jax.jit(program).lower(*jax.tree.map(shape, (dyn, arrays, lam))).compile().memory_analysis()
    return int(getattr(memory, "temp_size_in_bytes", -1)) if memory is not None else -1


def choose(rows: list[Row], budget: int | None, measure: Callable[[Row], int]) -> Row | None:
    """The fastest exact row whose bytes fit ``budget`` (ties: the fewest bytes), or ``None``.

    ``measure(row)`` gives a row's bytes; it is called only as far as needed: not at all without a
    budget, and for no row slower than the first group of equally fast rows with one that fits.
    """
    exact = sorted((r for r in rows if r.exact), key=lambda r: r.cost)
    for _, group in itertools.groupby(exact, key=lambda r: r.cost):
        group = list(group)
        if budget is None:
            return group[0]
        fits = [r for r in (r._replace(bytes=measure(r)) for r in group) if 0 <= r.bytes <= budget]
        if fits:
            return min(fits, key=lambda r: r.bytes)
    return None


def _norm(model, lam):
    """The stand-in objective Auto plans with (it has none): ½‖w‖², whose gradient costs nothing
    next to the run's."""
    return 0.5 * sum(jnp.vdot(x, x) for x in jax.tree.leaves(model) if jnp.issubdtype(getattr(x, "dtype", int), jnp.inexact))


def traced(lam) -> bool:
    """Whether λ is traced (under ``jit`` or ``vmap``), so nothing can depend on its values."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(lam))


_choices: dict = {}


@dataclasses.dataclass(frozen=True)
class Auto(Method):
    """The exact method that :func:`hypergradient.plan` would choose, run.

    Forward when the hyperparameters are few, Reverse when its trajectory fits the budget, then
    checkpointing (one level, then two and three nested levels), then Reversible (sgd and momentum
    only) when memory is tightest: the fastest exact candidate (see this module) whose program
    fits. The memory is XLA's figure for each candidate's program, compiled from the shapes and
    never run, with ½‖w_T‖² standing in for the objective (a method receives none when it is
    chosen): the budget covers differentiating the run, and an objective's own temporaries (a
    validation forward pass) come on top. The choice is made once per budget and problem shapes
    (so also under ``jit``, where λ is traced); :func:`hypergradient.hypergrad` reports it in
    ``stats["method"]``.

    Args:
      memory_budget: bytes of XLA temporary memory the program may use (``None``: no limit).

    Raises:
      MethodError: no exact method fits the budget (the message gives the smallest, and the
        inexact ``hg.Truncated(k)`` and ``hg.DrMAD()`` to pick by hand).
    """

    memory_budget: int | None = None

    def __post_init__(self):
        b = self.memory_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0):
            raise ValueError(f"memory_budget must be a positive number of bytes or None, got {b!r}")

    def resolve(self, dyn, lam) -> Method:
        """The chosen method, resolved at λ when λ is concrete."""
        choice = self._choose(dyn, lam)
        return choice if traced(lam) else choice.resolve(dyn, lam)

    def value_and_grad(self, dyn, objective, lam):
        return self.resolve(dyn, lam).value_and_grad(dyn, objective, lam)

    def _choose(self, dyn, lam) -> Method:
        key = (self, signature(dyn), signature(lam))
        if key not in _choices:
            if len(_choices) >= 64:
                _choices.clear()
            _choices[key] = self._plan(dyn, lam)
        return _choices[key]

    def _plan(self, dyn, lam) -> Method:
        measured = []

        def measure(row):
            method = row.method if traced(lam) else row.method.resolve(dyn, lam)
            measured.append((temp_bytes(dyn, _norm, method, lam), method))
            return measured[-1][0]

        row = choose(candidates(dyn, lam), self.memory_budget, measure)
        if row is not None:
            return row.method
        smallest, method = min(measured, key=lambda bm: bm[0])
        raise MethodError(
            f"no exact method fits a memory budget of {self.memory_budget} bytes for this run of {dyn.steps} "
            f"steps: the smallest, {method!r}, needs {smallest} bytes of XLA temporary memory; raise the budget, shorten the run, or choose an approximate method by hand: "
            "hg.Truncated(k) or hg.DrMAD() (hg.plan shows every method's memory)"
        )
