"""Data attribution by metagradient: which training examples make the objective what it is.

Give every training example i a weight u_i in the training loss (``loss(w, λ, batch, *,
example_weights)``, for example ``jnp.mean(example_weights * per_example_loss)``). The score of
example i is

    score_i = ∂f/∂u_i at u = 1,     f(u) = objective(w_T(λ, u), λ),

the derivative through the whole training run (MAGIC, Ilyas & Engstrom 2025), computed as the
hypergradient of the run :func:`~hypergradient.example_weights.weighted` over λ' = (λ, u) by
Reverse-HG: one forward and one backward pass (~3x a training run) for all n scores at once.
Dropping example i (u_i: 1 → 0) changes f by ≈ −score_i: a positive score marks an example
that raises the objective (harmful to a validation loss), a negative one an example that helps.

A vector-valued objective (one loss per validation example) gives one row of scores per entry,
the backward pass ``vmap``-ed over ``chunk_size`` rows of the identity at a time (the forward
run is shared within a chunk).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._pytree import nbytes, partition, signature
from .dynamics import Dynamics, check_finite
from .errors import Failure, MethodError
from .example_weights import unit_weights, weighted
from .hypergrad import ProgramCache, raise_failure, temp_bytes, value_and_grad
from .methods.base import Method
from .methods.reverse import Reverse
from .precision import matmul_precision


class AttributionResult(NamedTuple):
    """Result of :func:`attribute`.

    Attributes:
      scores: ∂f/∂u_i at u = 1, shape ``(n,)`` for a scalar objective, ``(k, n)`` for one of
        ``k`` outputs (row j: the scores for output j).
      indices: the example ids, ``arange(n)``: row i of the data given to ``Dynamics`` (of
        ``Batches``' arrays, or of the fixed batch).
      value: the objective at the end of the run, a scalar or its ``k`` outputs.
      stats: ``method``, ``seconds``, ``compile_seconds``, ``chunks`` (backward passes batched),
        ``temp_bytes`` (XLA's peak temporary memory of one chunk's program, -1 if unknown),
        ``state_bytes`` (one training state), ``examples``.
    """

    scores: np.ndarray
    indices: np.ndarray
    value: np.ndarray
    stats: dict

    def save(self, path) -> None:
        """Write ``scores``, ``indices`` and ``value`` to the ``.npz`` file ``path``."""
        np.savez(path, scores=self.scores, indices=self.indices, value=self.value)


@dataclasses.dataclass(frozen=True)
class _Projected:
    """The objective of the weighted run: ``objective(w, λ'[0])``, contracted with ``row`` when it
    has several outputs. A pytree (the user's objective's arrays and ``row`` are leaves)."""

    objective: Any
    row: Any

    def __call__(self, w, lam, **kwargs):
        out = self.objective(w, lam[0], **kwargs)
        return out if self.row is None else jnp.vdot(self.row, jnp.reshape(out, -1))


jax.tree_util.register_dataclass(_Projected, data_fields=["objective", "row"], meta_fields=[])

_programs = ProgramCache(16)


def attribute(dyn: Dynamics, objective: Callable, lam, *, method: Method | None = None,
              chunk_size: int = 32, weights=None) -> AttributionResult:
    """One score per training example: ∂objective/∂(weight of the example) at weight 1.

    Args:
      dyn: the training run; its ``loss`` takes ``example_weights`` (the batch's weights, one per
        example) as a keyword, and its data must say which examples a batch holds
        (:class:`~hypergradient.Batches`, sharded too, or a fixed batch).
      objective: ``(w, λ) -> scalar``, or an array of per-example validation losses (then one row
        of scores per entry); ``(w, λ, state=s_T)`` for a run given ``state=``.
      lam: the hyperparameters of the run, held fixed.
      method: ``hg.Reverse(...)`` (default ``hg.Reverse()``; ``checkpoint_every`` for long runs;
        ``second_order="forward"`` for convolutional networks: the same scores in a fraction of
        the memory, and faster, where reverse-over-reverse keeps every step's patches).
      chunk_size: rows of a vector objective whose backward passes run together (``vmap``).
      weights: the example weights u at which to differentiate, one per training example
        (default 1, the plain run; u ∈ {0, 1}^n: the run on a subset, scoring the dropped
        examples too).

    Returns:
      An :class:`AttributionResult`.

    Raises:
      MethodError: ``method`` cannot give the exact derivative through the whole run.
      TypeError: the data does not say which examples a batch holds, or the loss takes no
        ``example_weights``.
      DivergenceError: training, the objective or the scores are not finite.
    """
    method = Reverse() if method is None else method
    _check_method(method)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    run = weighted(dyn)
    ones = unit_weights(dyn, lam)
    if weights is not None and jnp.shape(weights) != ones.shape:
        raise ValueError(f"weights must hold one weight per training example, shape {ones.shape}, "
                         f"got shape {jnp.shape(weights)}")
    lam2 = (lam, ones if weights is None else jnp.asarray(weights, ones.dtype))
    shape = _check(run, objective, lam2, method)
    outputs = math.prod(shape)
    vector = shape != ()
    rows = min(chunk_size, outputs) if vector else 0
    exe, compile_seconds, sizes = _compiled(run, objective, method, lam2, rows, outputs)
    arrays, _ = partition(objective)
    identity = np.eye(outputs, dtype=lam2[1].dtype)
    scores, values = [], []
    start = time.perf_counter()
    for first in range(0, outputs, rows) if vector else [0]:
        chunk = None
        if vector:
            chunk = np.zeros((rows, outputs), identity.dtype)
            block = identity[first:first + rows]
            chunk[: len(block)] = block
        grad, value, result, stats, losses, diverged = jax.block_until_ready(exe(run, arrays, lam2, chunk))
        _raise(method, run, result, stats, losses, diverged, value)
        take = min(rows, outputs - first) if vector else None
        scores.append(np.asarray(grad)[:take] if vector else np.asarray(grad))
        values.append(np.asarray(value)[:take] if vector else np.asarray(value))
    seconds = time.perf_counter() - start
    n = scores[0].shape[-1]
    stats = {"method": repr(method), "seconds": seconds, "compile_seconds": compile_seconds,
             "chunks": len(scores), "examples": n, **sizes}
    if not vector:
        return AttributionResult(scores[0], np.arange(n), values[0], stats)
    return AttributionResult(np.concatenate(scores).reshape(*shape, n), np.arange(n),
                             np.concatenate(values).reshape(shape), stats)


def _check_method(method) -> None:
    if isinstance(method, Reverse):
        return
    if not isinstance(method, Method):
        raise TypeError(f"method must be a hypergradient method (hg.Reverse()), got {method!r}")
    raise MethodError(
        f"attribute needs the exact derivative through the whole run in n example weights, which hg.Reverse() "
        f"(checkpoint_every= for long runs) gives in one backward pass; {type(method).__name__} cannot serve it "
        "(Forward carries n tangents, Truncated, DrMAD and Implicit approximate the run)")


def _check(run: Dynamics, objective, lam2, method) -> tuple[int, ...]:
    """Check the weighted run and the objective; return the objective's output shape."""
    try:
        run.validate(lam2)
    except ValueError as e:
        if "example_weights" in str(e):
            raise TypeError("attribute: the training loss must take the keyword example_weights (the weights of "
                            "the batch's examples), e.g. loss(w, λ, batch, *, example_weights=1.0)") from e
        raise
    run.check_finite()
    check_finite(lam2[0], "hyperparameter")
    method.check(run)
    if not callable(objective):
        raise TypeError("objective must be a function (w, λ) -> scalar or array of losses")
    out = jax.eval_shape(lambda l: run.objective_at(_Projected(objective, None), run.initial_state(l), l), lam2)
    if not hasattr(out, "shape") or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"objective must return floating-point values, it returned {out}")
    return tuple(out.shape)


def _compiled(run: Dynamics, objective, method: Method, lam2, rows: int, outputs: int):
    """The compiled scores of one chunk of ``rows`` outputs (``rows=0``: a scalar objective), cached;
    ``(executable, compile_seconds, sizes)``."""
    arrays, skeleton = partition(objective)
    key = (signature(run), skeleton, signature(arrays), method, signature(lam2), rows, matmul_precision())
    hit = _programs.get(key)
    if hit is not None:
        return hit[0], 0.0, hit[1]

    def one(d, obj, l, row):
        sol = value_and_grad(d, _Projected(obj, row), l, method)
        return sol.grad[1], sol.value, sol.result, sol.stats, sol.losses, sol.diverged

    def program(d, a, l, chunk):
        obj = skeleton.combine(a)
        if chunk is None:
            return one(d, obj, l, None)
        return jax.vmap(lambda row: one(d, obj, l, row))(chunk)

    chunk = jax.ShapeDtypeStruct((rows, outputs), lam2[1].dtype) if rows else None
    start = time.perf_counter()
    exe = jax.jit(program).lower(run, arrays, lam2, chunk).compile()
    seconds = time.perf_counter() - start
    sizes = {"temp_bytes": temp_bytes(exe), "state_bytes": nbytes(jax.eval_shape(run.initial_state, lam2))}
    _programs.put(key, (exe, sizes))
    return exe, seconds, sizes


def _raise(method, run, result, stats, losses, diverged, value) -> None:
    """Raise (or warn) for the first chunk row that failed."""
    result = np.atleast_1d(np.asarray(result))
    bad = np.flatnonzero(result != Failure.OK)
    if not bad.size:
        return
    i = int(bad[0])
    pick = (lambda x: np.asarray(x)[i]) if np.ndim(np.asarray(diverged)) else np.asarray
    sol = _Failed(pick(value), pick(losses), bool(pick(diverged)))
    raise_failure(method, Failure(int(result[i])), {k: pick(v).item() for k, v in stats.items()}, sol, run.steps)


class _Failed(NamedTuple):
    value: Any
    losses: Any
    diverged: bool

