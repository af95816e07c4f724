"""``hg.plan``: every method that can serve a training run, with its memory and time, before running any.

    p = hg.plan(dyn, objective, λ, memory_budget=200 * 2**20)
    print(p)                                   # the table
    hg.hypergrad(dyn, objective, λ, p.choice)  # the fastest exact method that fits

Memory is XLA's own figure for each method's compiled program (``temp_size_in_bytes``, compiled
from shapes, never run). Time is a probe and a model: one training run of ``PROBE_STEPS`` steps is
timed, scaled to T steps, and multiplied by each method's cost (:mod:`hypergradient.methods.auto`).
The choice is :class:`~hypergradient.Auto`'s rule, on the user's objective rather than a stand-in.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import jax
import numpy as np

from .dynamics import Dynamics, train
from .methods.auto import Row, candidates, choose, temp_bytes
from .methods.base import Method, Objective

#: Steps of the timed training run that predicts the seconds of every method.
PROBE_STEPS = 50


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`plan` found.

    Attributes:
      rows: one :class:`~hypergradient.methods.auto.Row` per method and setting (``method``,
        ``exact``, ``cost``: time as a multiple of a training run, ``bytes``: XLA's temporary
        memory, ``seconds``: predicted), fastest first.
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
        right = {3, 4, 5}
        lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                 for row in table]
        tail = f"choice: {self.choice!r}" if self.choice is not None else "choice: none, no exact method fits the budget"
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
        rows.append(row._replace(method=method, bytes=temp_bytes(dyn, objective, method, lam),
                                 seconds=row.cost * training_seconds))
    rows.sort(key=lambda r: (not r.exact, r.cost, r.bytes))
    best = choose(rows, memory_budget, lambda r: r.bytes)
    m = sum(int(np.size(x)) for x in jax.tree.leaves(lam))
    return Plan(tuple(rows), best and best.method, memory_budget, dyn.steps, m, training_seconds)


def _probe(dyn: Dynamics, lam) -> float:
    """Seconds per training step: the median of three timed runs of ``PROBE_STEPS`` steps, after
    one that compiles."""
    short = copy.copy(dyn)
    short.steps = min(dyn.steps, PROBE_STEPS)
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
