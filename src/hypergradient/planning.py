"""Choosing the method: :func:`plan` shows every method that can serve a training run, with its
memory and time, before running any; :class:`Auto` runs the one it would choose.

    p = hg.plan(dyn, objective, λ, memory_budget=200 * 2**20)
    print(p)                                                # the table
    hg.hypergrad(dyn, objective, λ, hg.Auto(200 * 2**20))   # p.choice, run

The candidates for a run of T steps with m hyperparameters and a state of d numbers, and the cost
model that orders them (time as a multiple of one training run, measured on B1):

    candidate                                          exact   time      memory
    Forward()                               (m <= 16)  yes     1 + m     m·d
    Reverse()                                          yes     3         T·d
    Reverse(checkpoint_every=k), k = √T/2, √T, 2√T     yes     4         (T/k + k)·d
    Reverse(checkpoint_every=(k_1, ..., k_L)),         yes     3 + L     ~(L+1)·T^(1/(L+1))·d
        L = 2, 3, k_i = T^((L+1-i)/(L+1))
    Reversible()       (sgd, momentum: ``reversal``)   yes     5         d + T·d·(bits lost per step)/32
    Truncated(T/10)                                    no      1 + 2k/T  k·d
    DrMAD()                                            no      3         2d

Memory is not modelled: it is XLA's own figure (``temp_size_in_bytes``) for the program
:func:`~hypergradient.hypergrad` would run, compiled from the arguments' shapes and never run.
Time is a probe and the model: one training run of ``PROBE_STEPS`` steps is timed, scaled to T
steps and multiplied by the candidate's cost. The choice is the fastest exact candidate whose
program fits the budget (among equally fast ones, the smallest); inexact ones are only shown.

This module sits above :mod:`hypergradient.hypergrad`, whose program it measures; :class:`Auto`
is a method like the others, defined here because choosing needs that program.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_int
from ._pytree import partition, signature
from .dynamics import Dynamics, train
from .errors import MethodError
from .hypergrad import ProgramCache, compiled, temp_bytes, value_and_grad
from .methods import DrMAD, Forward, Method, Reverse, Reversible, Truncated
from .methods.base import Objective

#: Forward is a candidate up to this many hyperparameters (its time grows like 1 + m).
FORWARD_MAX_HPARAMS = 16
#: Steps of the timed training run that predicts the seconds of every method.
PROBE_STEPS = 50


class Row(NamedTuple):
    """One candidate: the method, whether its hypergradient is exact, its time as a multiple of a
    training run (the cost model), and XLA's temporary bytes and the predicted seconds once known."""

    method: Method
    exact: bool
    cost: float
    bytes: int | None = None
    seconds: float | None = None


def candidates(dyn: Dynamics, lam) -> list[Row]:
    """The methods and settings that can serve ``dyn``, with their cost model (no bytes yet)."""
    steps = dyn.steps
    m = sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(lam))
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


def program_bytes(dyn: Dynamics, objective: Objective, method: Method, lam) -> int:
    """XLA's peak temporary memory of the program :func:`~hypergradient.hypergrad` runs for
    ``method``, compiled and never run: through hypergrad's cache when every argument is concrete
    (a later ``hg.hypergrad`` with this method reuses the program), else from the shapes (λ, the
    arrays of ``dyn`` and of ``objective`` may be traced, or ``jax.ShapeDtypeStruct``)."""
    arrays, skeleton = partition(objective)
    if not any(isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct)) for x in jax.tree.leaves((dyn, arrays, lam))):
        return compiled(dyn, objective, method, lam)[2]["temp_bytes"]

    def shape(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.core.Tracer) else x

    program = jax.jit(lambda d, a, l: value_and_grad(d, skeleton.combine(a), l, method))
    return temp_bytes(program.lower(*jax.tree.map(shape, (dyn, arrays, lam))).compile())


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


def traced(lam) -> bool:
    """Whether λ is traced (under ``jit`` or ``vmap``), so nothing can depend on its values."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(lam))


def _norm(model, lam):
    """The objective Auto plans with when it is given none: ½‖w‖², whose gradient costs nothing
    next to the run's."""
    floats = [x for x in jax.tree.leaves(model) if jnp.issubdtype(getattr(x, "dtype", int), jnp.inexact)]
    return 0.5 * sum(jnp.vdot(x, x) for x in floats)


_choices = ProgramCache(64)  # the chosen method per (Auto, problem shapes)


@dataclasses.dataclass(frozen=True)
class Auto(Method):
    """The exact method that :func:`plan` would choose, run.

    Forward when the hyperparameters are few, Reverse when its trajectory fits the budget, then
    checkpointing (one level, then two and three nested levels), then Reversible (sgd and momentum
    only) when memory is tightest: the fastest exact candidate (see this module) whose program
    fits, measured with the user's objective. Under ``jit`` or ``vmap`` of λ the choice is made
    from the shapes alone, with ½‖w_T‖² standing in for the objective (whose arrays may be traced
    there): the budget then covers differentiating the run, and the objective's own temporaries
    (a validation forward pass) come on top. The choice is made once per budget and problem
    shapes; :func:`hypergradient.hypergrad` reports it in ``stats["method"]``.

    Args:
      memory_budget: bytes of XLA temporary memory the program may use (``None``: no limit).

    Raises:
      MethodError: no exact method fits the budget (the message gives the smallest, and the
        inexact ``hg.Truncated(k)`` and ``hg.DrMAD()`` to pick by hand).
    """

    memory_budget: int | None = None

    def __post_init__(self):
        if self.memory_budget is not None:
            check_int("memory_budget (bytes, or None)", self.memory_budget)

    def resolve(self, dyn, lam, objective=None) -> Method:
        """The chosen method (resolved at λ when λ is concrete)."""
        objective = _norm if objective is None else objective
        arrays, skeleton = partition(objective)
        key = (self, signature(dyn), signature(lam), skeleton, signature(arrays))
        choice = _choices.get_or_build(key, lambda: self._choose(dyn, lam, objective))
        return choice if traced(lam) else choice.resolve(dyn, lam)

    def value_and_grad(self, dyn, objective, lam):
        return self.resolve(dyn, lam).value_and_grad(dyn, objective, lam)

    def _choose(self, dyn, lam, objective) -> Method:
        measured = []

        def measure(row):
            method = row.method if traced(lam) else row.method.resolve(dyn, lam)
            measured.append((program_bytes(dyn, objective, method, lam), method))
            return measured[-1][0]

        row = choose(candidates(dyn, lam), self.memory_budget, measure)
        if row is not None:
            return row.method
        smallest, method = min(measured, key=lambda bm: bm[0])
        raise MethodError(
            f"no exact method fits a memory budget of {self.memory_budget} bytes for this run of "
            f"{dyn.steps} steps: the smallest, {method!r}, needs {smallest} bytes of XLA temporary memory; "
            "raise the budget, shorten the run, or choose an approximate method by hand: hg.Truncated(k) "
            "or hg.DrMAD() (hg.plan shows every method's memory)"
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`plan` found.

    Attributes:
      rows: one :class:`Row` per method and setting (``method``, ``exact``, ``cost``: time as a
        multiple of a training run, ``bytes``: XLA's temporary memory, ``seconds``: predicted),
        exact ones first, then by time.
      choice: the fastest exact method within the budget, or ``None`` when none fits.
      memory_budget: the budget in bytes (``None``: none).
      steps, hparam_numbers: the run's T and m.
      training_seconds: one training run of T steps, as the probe predicts it.
    """

    rows: tuple[Row, ...]
    choice: Method | None
    memory_budget: int | None
    steps: int
    hparam_numbers: int
    training_seconds: float

    def __str__(self) -> str:
        budget = "no memory budget" if self.memory_budget is None else f"memory budget {_size(self.memory_budget)}"
        head = (f"plan for {self.steps} steps, {self.hparam_numbers} hyperparameters, {budget}; "
                f"a training run takes ~{self.training_seconds:.3g} s")
        table = [("", "method", "exact", "XLA temp", "~seconds", "~x training", "")]
        for r in self.rows:
            over = self.memory_budget is not None and r.bytes > self.memory_budget
            table.append(("*" if r.method == self.choice else "", repr(r.method), "yes" if r.exact else "no",
                          _size(r.bytes), f"{r.seconds:.3g}", f"{r.cost:.3g}", "over budget" if over else ""))
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines = ["  ".join(c.rjust(w) if i in (3, 4, 5) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 .rstrip() for row in table]
        tail = f"choice: {self.choice!r}" if self.choice else "choice: none, no exact method fits the budget"
        return "\n".join([head, *lines, tail])


def plan(dyn: Dynamics, objective: Objective, lam, memory_budget: int | None = None) -> Plan:
    """Every applicable method for this run, its XLA temporary memory and predicted time, and the choice.

    Compiles one program per row (never runs them) and times one short training run; nothing of
    the hypergradient is computed. ``hg.Auto(memory_budget)`` makes the same choice.

    Args:
      dyn: the training run.
      objective: ``(w, λ) -> scalar`` at the final weights, as for :func:`hypergradient.hypergrad`.
      lam: the hyperparameters (concrete: the probe runs).
      memory_budget: bytes of XLA temporary memory allowed (``None``: no limit).

    Returns:
      A :class:`Plan`; ``print`` it for the table, run ``.choice``.
    """
    dyn.validate(lam)
    training_seconds = _probe(dyn, lam) * dyn.steps
    rows = []
    for row in candidates(dyn, lam):
        method = row.method.resolve(dyn, lam)
        rows.append(row._replace(method=method, bytes=program_bytes(dyn, objective, method, lam),
                                 seconds=row.cost * training_seconds))
    rows.sort(key=lambda r: (not r.exact, r.cost, r.bytes))
    best = choose(rows, memory_budget, lambda r: r.bytes)
    m = sum(int(np.size(x)) for x in jax.tree.leaves(lam))
    return Plan(tuple(rows), best and best.method, memory_budget, dyn.steps, m, training_seconds)


def _probe(dyn: Dynamics, lam) -> float:
    """Seconds per training step: the median of three timed runs of ``PROBE_STEPS`` steps, after
    one that compiles."""
    short = dyn.replace(steps=min(dyn.steps, PROBE_STEPS))
    jax.block_until_ready(train(short, lam))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(train(short, lam))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / short.steps


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps a number ≥ 1 (``-1``: XLA did not say)."""
    if n < 0:
        return "unknown"
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.4g} {unit}"
        n /= 1024
    return f"{n:.4g} GiB"
