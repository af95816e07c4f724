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
    the two above with second_order="forward"          yes     +0.5      less where activations dominate
    Reverse(checkpoint_every=(k_1, ..., k_L)),         yes     3 + L     ~(L+1)·T^(1/(L+1))·d
        L = 2, 3, k_i = T^((L+1-i)/(L+1))
    Reversible()       (sgd, momentum: ``reversal``)   yes     5         d + T·d·(bits lost per step)/32
    Truncated(T/10)                                    no      1 + 2k/T  k·d
    DrMAD()                                            no      3         2d

Memory is XLA's own figure (``temp_size_in_bytes``), read from programs compiled from the
arguments' shapes, but not from each candidate's program at full length: compiling is the
expensive part (tens of seconds a program for a small CNN on CPU, and a scan compiles in the same
time at 8 steps as at 10,000), so :func:`plan` compiles a few short programs once, side by side,
and predicts every row from them (:func:`profile`, :func:`predict`):

    Reverse at 4 and 8 steps          base + per_step·T (exactly affine in T); the same for
                                      second_order="forward", whose rows follow the same laws
    checkpointed Reverse              base, per_step and the state's size, by the law of predict
    Truncated(k)                      Reverse's law at k steps (the window is a Reverse of k steps)
    Forward at 4 steps                nothing of it grows with T
    Reversible at 8 steps             plus its buffer's growth
    DrMAD                             Reverse's base and one more state
    the objective's gradient alone    its share of every row (Plan.objective_bytes)

Programs read only for their memory are compiled without the backend's optimizations
(:data:`MEMORY_ONLY`), which do not change XLA's buffers. Time is a probe and the model: the
8-step Reverse program is compiled whole and run once, and so is the objective's gradient; their
difference is Reverse's time per step, a training step is a third of it (Reverse's cost), and a
candidate's seconds are the objective's plus its cost times T training steps. The choice is the
fastest exact candidate that fits the budget (among equally fast ones, the one predicted
smallest); under a budget its own program is compiled at full length through
:func:`hypergradient.hypergrad`'s cache, where the run reuses it, and must fit, else the next is
tried. Inexact candidates are only shown.

This module sits above :mod:`hypergradient.hypergrad`, whose program it measures; :class:`Auto`
is a method like the others, defined here because choosing needs that program.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_int
from ._pytree import nbytes, partition, signature
from .dynamics import Dynamics
from .errors import MethodError
from .hypergrad import ProgramCache, compiled, temp_bytes, value_and_grad
from .methods import DrMAD, Forward, Method, Reverse, Reversible, Truncated
from .methods.base import Objective
from .smoothness import REMEDIES, Smoothness, smoothness

#: Forward is a candidate up to this many hyperparameters (its time grows like 1 + m).
FORWARD_MAX_HPARAMS = 16
#: What forward-over-reverse backward steps add to Reverse's time, in training runs (a gradient's
#: recomputation per step, against the stored activations it saves).
MIXED_COST = 0.5
#: Reverse is compiled at SHORT // 2 and SHORT steps to fit its memory a + b·T (and run at SHORT
#: steps by :func:`plan` to time it).
SHORT = 8
#: Reverse's time as a multiple of a training run, in the cost model.
REVERSE_COST = 3.0
#: A program that runs for less than this many seconds is timed as the median of five runs.
QUICK = 0.1
#: Options of programs compiled only to read their memory: XLA assigns the buffers before the backend's
#: (LLVM's) optimizations, so the figure is the same, in about half the compile time on CPU.
MEMORY_ONLY = {"xla_backend_optimization_level": 0}


class Row(NamedTuple):
    """One candidate: the method, whether its hypergradient is exact, its time as a multiple of a
    training run (the cost model that orders the candidates), XLA's temporary bytes and the
    predicted seconds once known, and whether those bytes were measured on the program itself (at
    the run's full length, as for the choice under a budget) rather than predicted."""

    method: Method
    exact: bool
    cost: float
    bytes: int | None = None
    seconds: float | None = None
    measured: bool = False


def candidates(dyn: Dynamics, lam) -> list[Row]:
    """The methods and settings that can serve ``dyn``, with their cost model (no bytes yet)."""
    steps = dyn.steps
    m = sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(lam))
    rows = [Row(Forward(), True, 1.0 + m)] if m <= FORWARD_MAX_HPARAMS else []
    rows += [Row(Reverse(), True, REVERSE_COST), Row(Reverse(second_order="forward"), True, REVERSE_COST + MIXED_COST)]
    for k in sorted({round(f * math.sqrt(steps)) for f in (0.5, 1, 2)}):
        if 2 <= k < steps:
            rows += [Row(Reverse(checkpoint_every=k), True, 4.0),
                     Row(Reverse(checkpoint_every=k, second_order="forward"), True, 4.0 + MIXED_COST)]
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


def _shape(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.core.Tracer) else x


def program_bytes(dyn: Dynamics, objective: Objective, method: Method, lam) -> int:
    """XLA's peak temporary memory of the program :func:`~hypergradient.hypergrad` runs for
    ``method``, compiled and never run: through hypergrad's cache when every argument is concrete
    (a later ``hg.hypergrad`` with this method reuses the program), else from the shapes (λ, the
    arrays of ``dyn`` and of ``objective`` may be traced, or ``jax.ShapeDtypeStruct``)."""
    arrays, skeleton = partition(objective)
    if not any(isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct)) for x in jax.tree.leaves((dyn, arrays, lam))):
        return compiled(dyn, objective, method, lam)[2]["temp_bytes"]
    return short_bytes(dyn, objective, method, lam, dyn.steps)


def short_bytes(dyn: Dynamics, objective: Objective, method: Method, lam, steps: int) -> int:
    """XLA's temporary memory of ``method``'s program for the run cut to ``steps`` steps (λ whole),
    compiled from the shapes for its memory only (:data:`MEMORY_ONLY`), never run nor cached."""
    return temp_bytes(_lower(dyn, objective, method, lam, steps).compile(MEMORY_ONLY))


def _lower(dyn: Dynamics, objective: Objective, method: Method, lam, steps: int):
    arrays, skeleton = partition(objective)
    short = dyn.replace(steps=steps)
    program = jax.jit(lambda d, a, l: value_and_grad(d, skeleton.combine(a), l, method))
    return program.lower(*jax.tree.map(_shape, (short, arrays, lam)))


def _compile_all(jobs: dict) -> dict:
    """``{key: executable}`` for ``jobs`` (``{key: () -> executable}``, each lowering and compiling
    one program), built side by side: XLA compiles without Python's lock, so one program's tracing
    overlaps another's compile, and the programs are independent."""
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def objective_program(dyn: Dynamics, objective: Objective, lam):
    """The objective's value and gradient (in w and λ) at weights shaped like w_T, compiled alone
    (once per problem): the part of every method's memory that no choice of method changes."""
    arrays, skeleton = partition(objective)
    key = (signature(dyn), skeleton, signature(arrays), signature(lam))
    return _objectives.get_or_build(key, lambda: _objective_program(dyn, skeleton, arrays, lam))


_objectives = ProgramCache(16)


def _objective_program(dyn, skeleton, arrays, lam):
    params = jax.eval_shape(dyn.initial_params, lam)

    def grad(a, w, l):
        return jax.value_and_grad(lambda w, l: skeleton.combine(a)(dyn.model(w), l), (0, 1))(w, l)

    return jax.jit(grad).lower(jax.tree.map(_shape, arrays), params, jax.tree.map(_shape, lam)).compile()


class Profile(NamedTuple):
    """What the memory (and, for :func:`plan`, the time) of every candidate is predicted from.

    Attributes:
      base, per_step: Reverse's temporary bytes are ``base + per_step·T`` (fitted at SHORT // 2 and
        SHORT steps; ``base`` holds the objective's gradient, one step's temporaries and λ's
        cotangent, ``per_step`` what the backward pass keeps of one step).
      objective: the objective's value_and_grad alone (``objective_program``).
      state: bytes of one training state s_t.
      weights: the number of floating-point weights.
      horizons: the two short horizons (h1, h2).
      forward, reversible: bytes of those programs at short horizons (h1 for Forward, h2 for
        Reversible; ``None`` where not a candidate).
      mixed_base, mixed_per_step: ``base`` and ``per_step`` of ``Reverse(second_order="forward")``.
      reverse_seconds, objective_seconds: one run of Reverse at h2 steps and of the objective's
        value and gradient (``None`` unless timed).
    """

    base: int
    per_step: int
    objective: int
    state: int
    weights: int
    horizons: tuple[int, int]
    forward: int | None
    reversible: int | None
    mixed_base: int = -1
    mixed_per_step: int = -1
    reverse_seconds: float | None = None
    objective_seconds: float | None = None

    def step_seconds(self) -> float:
        """Seconds of one training step: a third (Reverse's cost) of what Reverse adds per step to
        the objective's gradient."""
        return max(self.reverse_seconds - self.objective_seconds, 0.0) / (REVERSE_COST * self.horizons[1])


def profile(dyn: Dynamics, objective: Objective, lam, rows: list[Row], timed: bool = False) -> Profile:
    """Compile the few short programs :func:`predict` needs, side by side; for their memory only,
    never run, unless ``timed``: then Reverse at SHORT steps is compiled whole and, with the
    objective's gradient, run once (λ concrete)."""
    h2 = min(dyn.steps, SHORT)
    h1 = max(1, h2 // 2)

    def job(method, steps, options=MEMORY_ONLY):
        return lambda: _lower(dyn, objective, method, lam, steps).compile(options)

    jobs = {("reverse", h2): job(Reverse(), h2, None if timed else MEMORY_ONLY),
            "objective": lambda: objective_program(dyn, objective, lam)}
    for row in rows:
        if isinstance(row.method, Reversible):  # its buffer grows with T (see predict)
            jobs[row.method] = job(row.method, h2)
        elif isinstance(row.method, Forward):  # nothing of it grows with T
            jobs[row.method] = job(row.method, h1)
    jobs[("reverse", h1)] = job(Reverse(), h1)
    if any(isinstance(r.method, Reverse) and r.method.second_order == "forward" for r in rows):
        for h in (h1, h2):
            jobs[("forward", h)] = job(Reverse(second_order="forward"), h)
    exes = _compile_all(jobs)
    got = {key: temp_bytes(exe) for key, exe in exes.items()}
    base, per_step = _affine(got[("reverse", h1)], got[("reverse", h2)], h1, h2)
    mixed = _affine(got[("forward", h1)], got[("forward", h2)], h1, h2) if ("forward", h1) in got else (-1, -1)
    forward = next((b for key, b in got.items() if isinstance(key, Forward)), None)
    reversible = next((b for key, b in got.items() if isinstance(key, Reversible)), None)
    state = nbytes(jax.eval_shape(dyn.initial_state, lam))
    weights = sum(math.prod(x.shape) for x in jax.tree.leaves(jax.eval_shape(dyn.initial_params, lam))
                  if jnp.issubdtype(x.dtype, jnp.inexact))
    seconds = (None, None)
    if timed:
        arrays, _ = partition(objective)
        seconds = (_seconds(exes[("reverse", h2)], dyn.replace(steps=h2), arrays, lam),
                   _seconds(exes["objective"], arrays, dyn.initial_params(lam), lam))
    return Profile(base, per_step, got["objective"], state, weights, (h1, h2), forward, reversible, *mixed, *seconds)


def _affine(r1: int, r2: int, h1: int, h2: int) -> tuple[int, int]:
    """``(base, per_step)`` of the memory ``base + per_step·T`` through (h1, r1) and (h2, r2)
    (``-1`` where XLA did not say)."""
    if min(r1, r2) < 0:
        return -1, -1
    per_step = max(0, (r2 - r1) // max(1, h2 - h1))
    return r2 - per_step * h2, per_step


def _seconds(exe, *args) -> float:
    """Seconds of one run of ``exe``: the first, or the median of five more when it is under
    :data:`QUICK` (then overheads a run pays once weigh)."""
    start = time.perf_counter()
    jax.block_until_ready(exe(*args))
    first = time.perf_counter() - start
    if first >= QUICK:
        return first
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(exe(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def predict(method: Method, steps: int, p: Profile) -> int:
    """XLA's temporary bytes for ``method`` on the whole run, from the short programs of ``p``.

    Reverse: ``base + per_step·T``. Checkpointing holds ``n_i`` states at level i (n_1 = ⌈T/k_1⌉,
    n_i = ⌈k_{i-1}/k_i⌉) and the residuals of one innermost segment of k_L steps, which are alive
    while the objective's temporaries are not, and each nested level its own copy of what Reverse
    holds besides the objective: ``base + (L − 1)·(base − objective) + state·Σn_i + max(0,
    per_step·k_L − objective)``. DrMAD holds w_0 besides what Reverse holds at T = 0, and
    Truncated(k) what Reverse holds at min(k, T) steps. Forward and Reversible are their own short
    programs (Reversible's buffer extrapolated linearly in T).
    """
    if isinstance(method, Reverse) and method.second_order == "forward":
        p = p._replace(base=p.mixed_base, per_step=p.mixed_per_step)
    if min(p.base, p.per_step, p.objective) < 0:
        return -1
    if isinstance(method, Reverse):
        if not method.levels:
            return p.base + p.per_step * steps
        held, outer = 0, steps
        for k in method.levels:
            held += -(-outer // k)
            outer = k
        nested = (len(method.levels) - 1) * max(0, p.base - p.objective)  # each nested level's own cotangents
        return p.base + nested + p.state * held + max(0, p.per_step * method.levels[-1] - p.objective)
    if isinstance(method, Truncated):
        return p.base + p.per_step * min(method.k, steps)
    if isinstance(method, Forward):
        return p.forward
    if isinstance(method, Reversible):  # the buffer, max_bits_per_step per float weight per step, held twice
        bits = method.max_bits_per_step if method.max_bits_per_step is not None else 1.0
        return p.reversible + int(2 * p.weights * bits / 8 * max(0, steps - p.horizons[1]))
    if isinstance(method, DrMAD):
        return p.base + p.state
    raise TypeError(f"no memory model for {method!r}")


def choose(rows: list[Row], budget: int | None, measure: Callable[[Row], int]) -> Row | None:
    """The fastest exact row that fits ``budget``, or ``None``: in each group of equally fast rows
    (fastest first), the row predicted smallest whose program, measured, fits.

    ``measure(row)`` gives a row's real bytes; it is called only as far as needed: not at all
    without a budget, never for a row predicted over the budget (``row.bytes``), and within a
    group only until one fits. Returns the row with its measured bytes.
    """
    exact = sorted((r for r in rows if r.exact), key=lambda r: r.cost)
    for _, group in itertools.groupby(exact, key=lambda r: r.cost):
        group = list(group)
        if budget is None:
            return group[0]
        for row in sorted(group, key=lambda r: r.bytes):
            if row.bytes is not None and row.bytes > budget:
                continue
            row = row._replace(bytes=measure(row), measured=True)
            if 0 <= row.bytes <= budget:
                return row
    return None


def advice(budget: int, smallest: int, objective_bytes: int) -> str:
    """What to change when no exact method fits ``budget``: the objective when its gradient is most of
    the smallest program, else the run."""
    if objective_bytes >= 0 and objective_bytes >= smallest / 2:
        return (f"the objective's gradient alone needs {_size(objective_bytes)} of it, which no method changes: "
                "evaluate the objective in chunks (hg.chunked(loss, data, chunk_size)) or on fewer examples, "
                "or raise the budget")
    return "raise the budget, shorten the run"


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
    fits, predicted from short programs with the user's objective and checked on the chosen
    program itself, which the run then reuses (no compile at all without a budget). Under ``jit``
    or ``vmap`` of λ the choice is made
    from the shapes alone, with ½‖w_T‖² standing in for the objective (whose arrays may be traced
    there): the budget then covers differentiating the run, and the objective's own temporaries
    (a validation forward pass) come on top. The choice is made once per budget and problem
    shapes; :func:`hypergradient.hypergrad` reports it in ``stats["method"]``. The choice weighs
    cost and memory only: where Reverse's backward growth says chaos (``hg.ChaosWarning``), or on a
    relu run, no exact method's hypergradient may describe the objective; ``hg.plan(...,
    check_smoothness=True)`` and :func:`hypergradient.smoothness` say whether it does.

    Args:
      memory_budget: bytes of XLA temporary memory the program may use (``None``: no limit).

    Raises:
      MethodError: no exact method fits the budget (the message gives the smallest, what to change:
        the objective, with :func:`hypergradient.chunked`, when its gradient is most of that
        memory, else the run, and the inexact ``hg.Truncated(k)`` and ``hg.DrMAD()`` to pick by
        hand).
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
        if self.memory_budget is None:  # the fastest exact candidate; nothing to measure
            return choose(candidates(dyn, lam), None, None).method
        rows, p = _predicted(dyn, objective, lam, [r for r in candidates(dyn, lam) if r.exact])
        row, rows = _pick(dyn, objective, lam, rows, self.memory_budget)
        if row is not None:
            return row.method
        raise MethodError(_nothing_fits(dyn, rows, self.memory_budget, p.objective))


def _predicted(dyn, objective, lam, rows: list[Row], timed: bool = False) -> tuple[list[Row], Profile]:
    """``rows`` with their methods resolved and their bytes predicted from the short programs, and
    the profile they were predicted from (timed: see :func:`profile`)."""
    rows = [r._replace(method=r.method if traced(lam) else r.method.resolve(dyn, lam)) for r in rows]
    p = profile(dyn, objective, lam, rows, timed)
    return [r._replace(bytes=predict(r.method, dyn.steps, p)) for r in rows], p


def _pick(dyn, objective, lam, rows, budget):
    """The choice among ``rows`` (verified on the full program under a budget), and the rows with
    what was measured filled in."""
    measured = {}

    def measure(row):
        measured[row.method] = program_bytes(dyn, objective, row.method, lam)
        return measured[row.method]

    best = choose(rows, budget, measure)
    rows = [r._replace(bytes=measured[r.method], measured=True) if r.method in measured else r for r in rows]
    return best, rows


def _nothing_fits(dyn, rows, budget, objective_bytes) -> str:
    smallest = min((r for r in rows if r.exact and r.bytes is not None and r.bytes >= 0),
                   key=lambda r: r.bytes, default=None)
    if smallest is None:
        return (f"no exact method fits a memory budget of {budget} bytes for this run of {dyn.steps} steps "
                "(XLA did not report memory); choose an approximate method by hand: hg.Truncated(k) or hg.DrMAD()")
    how = "measured" if smallest.measured else "predicted"
    return (f"no exact method fits a memory budget of {budget} bytes for this run of {dyn.steps} steps: the "
            f"smallest, {smallest.method!r}, needs {smallest.bytes} bytes of XLA temporary memory ({how}); "
            f"{advice(budget, smallest.bytes, objective_bytes)}, or choose an approximate method by hand: "
            "hg.Truncated(k) or hg.DrMAD() (hg.plan shows every method's memory)")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`plan` found.

    Attributes:
      rows: one :class:`Row` per method and setting (``method``, ``exact``, ``cost``: the cost
        model's multiple of a training run that orders them, ``bytes``: XLA's temporary memory,
        predicted from short programs or ``measured`` on the full one, ``seconds``: predicted),
        exact ones first, then by time.
      choice: the fastest exact method within the budget, or ``None`` when none fits.
      memory_budget: the budget in bytes (``None``: none).
      steps, hparam_numbers: the run's T and m.
      training_seconds: one training run of T steps, as predicted from the timed Reverse program.
      objective_bytes: XLA's temporary memory of the objective's value and gradient alone, part of
        every row's bytes (:func:`hypergradient.chunked` lowers it).
      seconds: what making this plan took.
      smoothness: the :func:`hypergradient.smoothness` check at λ (``plan(..., check_smoothness=True)``),
        run with a Reverse that fits, whose backward growth says whether the run is chaotic;
        ``None``: not checked.
    """

    rows: tuple[Row, ...]
    choice: Method | None
    memory_budget: int | None
    steps: int
    hparam_numbers: int
    training_seconds: float
    objective_bytes: int = -1
    seconds: float = 0.0
    smoothness: Smoothness | None = None

    def __str__(self) -> str:
        budget = "no memory budget" if self.memory_budget is None else f"memory budget {_size(self.memory_budget)}"
        head = (f"plan for {self.steps} steps, {self.hparam_numbers} hyperparameters, {budget}; "
                f"a training run takes ~{self.training_seconds:.3g} s; the objective's gradient alone "
                f"{_size(self.objective_bytes)}")
        table = [("", "method", "exact", "XLA temp", "~seconds", "~x training", "")]
        for r in self.rows:
            over = self.memory_budget is not None and r.bytes > self.memory_budget
            note = ", ".join(n for n in ("measured" if r.measured else "", "over budget" if over else "") if n)
            table.append(("*" if r.method == self.choice else "", repr(r.method), "yes" if r.exact else "no",
                          ("" if r.measured else "~") + _size(r.bytes), f"{r.seconds:.3g}",
                          f"{r.seconds / self.training_seconds:.3g}" if self.training_seconds > 0 else "?", note))
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines = ["  ".join(c.rjust(w) if i in (3, 4, 5) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 .rstrip() for row in table]
        if self.choice:
            tail = f"choice: {self.choice!r}"
        else:
            smallest = min((r.bytes for r in self.rows if r.exact and r.bytes >= 0), default=-1)
            tail = ("choice: none, no exact method fits the budget; "
                    + advice(self.memory_budget, smallest, self.objective_bytes))
        return "\n".join([head, *lines, tail, *_smoothness_lines(self.smoothness),
                          f"(planned in {self.seconds:.3g} s; ~: predicted from short programs)"])


def _smoothness_lines(check: Smoothness | None) -> list[str]:
    """The plan's line on whether the exact hypergradient can be trusted (none when not checked)."""
    if check is None:
        return []
    if check.ok:
        growth = "" if check.backward_growth is None else f" (Reverse's backward growth {check.backward_growth:.3g}x)"
        return [f"hg.smoothness: ok, the exact hypergradient describes the objective's slopes{growth}"]
    return [f"hg.smoothness: not ok: {check.reason}; no exact method's hypergradient can be "
            f"trusted here: {REMEDIES}"]


def plan(dyn: Dynamics, objective: Objective, lam, memory_budget: int | None = None, *,
         check_smoothness: bool = False) -> Plan:
    """Every applicable method for this run, its XLA temporary memory and predicted time, and the choice.

    Compiles a few programs of a few steps, side by side: Reverse at two horizons (each way of
    computing its second-order products), Forward and Reversible where they are candidates, and
    the objective's gradient alone; the other rows follow from the memory laws of
    ``planning.predict``. Times one run of the longer Reverse and of the objective's gradient (the
    rest are compiled for their memory only, never run). Under a budget, the choice's own program
    is compiled at full length (hypergrad's cache keeps it for the run) to check that it fits. ``hg.Auto(memory_budget)``
    makes the same choice.

    Args:
      dyn: the training run.
      objective: ``(w, λ) -> scalar`` at the final weights, as for :func:`hypergradient.hypergrad`.
      lam: the hyperparameters (concrete: the short Reverse program runs).
      memory_budget: bytes of XLA temporary memory allowed (``None``: no limit).
      check_smoothness: also run :func:`hypergradient.smoothness` at λ with the fastest Reverse that
        fits (a hypergradient and 30 training runs): the plan then says whether the backward pass is
        chaotic and the exact hypergradient describes the objective, and what to do when not.

    Returns:
      A :class:`Plan`; ``print`` it for the table, run ``.choice``.
    """
    start = time.perf_counter()
    dyn.validate(lam)
    rows, p = _predicted(dyn, objective, lam, candidates(dyn, lam), timed=True)
    step = p.step_seconds()
    m = sum(int(np.size(x)) for x in jax.tree.leaves(lam))
    rows = [r._replace(seconds=p.objective_seconds + r.cost * step * dyn.steps) for r in rows]
    best, rows = _pick(dyn, objective, lam, rows, memory_budget)
    rows.sort(key=lambda r: (not r.exact, r.cost, r.bytes))
    check = None
    if check_smoothness:
        fits = [r.method for r in rows if isinstance(r.method, Reverse) and r.bytes is not None
                and (memory_budget is None or 0 <= r.bytes <= memory_budget)]
        if fits or best is not None:
            check = smoothness(dyn, objective, lam, method=fits[0] if fits else best.method)
    return Plan(tuple(rows), best and best.method, memory_budget, dyn.steps, m, step * dyn.steps, p.objective,
                time.perf_counter() - start, check)


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps a number ≥ 1 (``-1``: XLA did not say)."""
    if n < 0:
        return "unknown"
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.4g} {unit}"
        n /= 1024
    return f"{n:.4g} GiB"
