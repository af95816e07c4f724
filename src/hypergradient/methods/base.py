"""What every hypergradient method shares, and the one entry point ``hypergrad``.

A method is a small frozen object that knows *how to differentiate* a
training run (the model of optimistix's adjoints): ``value_and_grad(dyn,
objective, λ)`` is a pure, traceable function returning f(λ), ∇f(λ) and what
the run produced. ``hypergrad`` compiles it once per (dynamics, objective,
method, shapes), runs it, and turns NaN or inf into a ``DivergenceError``.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..dynamics import Dynamics, first_nonfinite
from ..errors import DivergenceError, MethodError

Objective = Callable[[Any, Any], jax.Array]


class Outputs(NamedTuple):
    """What a method returns beside the value and the gradient."""

    params: Any  # w_T
    losses: jax.Array  # training loss of every step it ran, shape (T,)
    extras: dict  # method-specific scalars for ``stats``


class HypergradResult(NamedTuple):
    """Result of :func:`hypergrad`.

    Attributes:
      value: f(λ), the objective at the final weights.
      grad: ∇f(λ), with λ's structure.
      params: the final weights w_T of the training run.
      stats: timings and memory figures (``seconds``, ``compile_seconds``,
        ``steps``, ``temp_bytes`` from XLA's memory analysis, and the
        method's own figures).
    """

    value: jax.Array
    grad: Any
    params: Any
    stats: dict


class Method:
    """Base of the hypergradient methods; subclasses are frozen dataclasses."""

    def check(self, dyn: Dynamics) -> None:
        """Raise ``MethodError`` if this method cannot serve ``dyn``."""

    def resolve(self, dyn: Dynamics, lam) -> Method:
        """This method with any setting left to be chosen from the concrete λ filled in.

        Called by :func:`hypergrad` before compiling (λ is concrete there); the
        default has nothing to choose.
        """
        return self

    def value_and_grad(self, dyn: Dynamics, objective: Objective, lam) -> tuple[jax.Array, Any, Outputs]:
        raise NotImplementedError

    def check_result(self, extras: dict) -> None:
        """Raise if the run's own flags (in ``extras``) show that it failed."""


def check_objective(dyn: Dynamics, objective: Objective, lam) -> None:
    """The objective must map (w_T, λ) to a real scalar."""
    if not callable(objective):
        raise TypeError("objective must be a function (w, λ) -> scalar")
    w = jax.eval_shape(dyn.initial_params, lam)
    out = jax.eval_shape(objective, w, lam)
    if not hasattr(out, "shape") or out.shape != ():
        raise ValueError(f"objective must return a scalar, it returned {getattr(out, 'shape', type(out).__name__)}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"objective must return a floating-point scalar, it returned {out.dtype}")


class ProgramCache:
    """A least-recently-used store of compiled programs, keyed by what they were built from."""

    def __init__(self, size: int):
        self.size = size
        self._items: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        """The program stored under ``key``, now the most recent, or ``None`` (``TypeError`` if
        ``key`` cannot be hashed)."""
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key, program):
        """Store ``program`` under ``key``, dropping the least recent beyond ``size``; returns it."""
        self._items[key] = program
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return program


_programs = ProgramCache(64)


def signature(tree) -> tuple:
    """What a compiled program depends on in a pytree: its structure (static fields included) and avals."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(jax.typeof(x) for x in leaves)


def compiled(dyn: Dynamics, objective: Objective, method: Method, lam):
    """The compiled ``method.value_and_grad`` for these arguments (method resolved first), cached.

    Returns ``(executable, compile_seconds, sizes)``; ``compile_seconds`` is 0
    on a hit; ``sizes`` holds XLA's peak temporary memory (``temp_bytes``, -1
    if unknown), the bytes of one training state and the number of
    hyperparameters, all computed once.
    """
    method = method.resolve(dyn, lam)  # a no-op when hypergrad has resolved it already
    key = (signature(dyn), objective, method, signature(lam))
    hit = _programs.get(key)
    if hit is not None:
        return hit[0], 0.0, hit[1]
    dyn.validate(lam)
    check_objective(dyn, objective, lam)
    method.check(dyn)
    start = time.perf_counter()
    exe = jax.jit(lambda d, l: method.value_and_grad(d, objective, l)).lower(dyn, lam).compile()
    seconds = time.perf_counter() - start
    memory = exe.memory_analysis()
    sizes = {
        "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)) if memory is not None else -1,
        "state_bytes": _nbytes(jax.eval_shape(dyn.initial_state, lam)),
        "hparam_numbers": sum(int(np.size(x)) for x in jax.tree.leaves(lam)),
    }
    _programs.put(key, (exe, sizes))
    return exe, seconds, sizes


def _nbytes(tree) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def hypergrad(dyn: Dynamics, objective: Objective, lam, method: Method | None = None) -> HypergradResult:
    """The hypergradient ∇f(λ) of f(λ) = objective(w_T(λ), λ).

    Args:
      dyn: the training run.
      objective: ``(w, λ) -> scalar``, evaluated at the final weights.
      lam: the hyperparameters, a pytree of floating-point arrays.
      method: how to differentiate: ``Reverse()`` (default), ``Forward()``,
        ``Truncated(k)``, ``Reversible()``, ``DrMAD()``.

    Returns:
      A :class:`HypergradResult`. The compiled program is reused by later
      calls with the same dynamics functions, objective, method and shapes.

    Raises:
      DivergenceError: the training loss, the objective or the hypergradient
        is NaN or inf (the error names the first non-finite training step).
      MethodError: the method cannot serve this dynamics.
    """
    from .reverse import Reverse

    if method is None:
        method = Reverse()
    if not isinstance(method, Method):
        raise TypeError(f"method must be a hypergradient method (hg.Reverse(), hg.Forward(), ...), got {method!r}")
    if not isinstance(dyn, Dynamics):
        raise TypeError(f"dyn must be a hypergradient.Dynamics, got {type(dyn).__name__}")
    method = method.resolve(dyn, lam)
    exe, compile_seconds, sizes = compiled(dyn, objective, method, lam)
    start = time.perf_counter()
    value, grad, out = jax.block_until_ready(exe(dyn, lam))
    seconds = time.perf_counter() - start
    extras = {k: np.asarray(v).item() for k, v in out.extras.items()}
    method.check_result(extras)
    step = first_nonfinite(out.losses)
    if step is not None:
        raise DivergenceError(
            f"training diverged: the training loss is not finite at step {step} of {dyn.steps}", step
        )
    if not np.isfinite(value) or not all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad)):
        raise DivergenceError(
            f"training stayed finite but the {'objective' if not np.isfinite(value) else 'hypergradient'} "
            f"is not (value {float(value)}); check the objective and the scale of λ"
        )
    stats = {
        "method": repr(method),
        "seconds": seconds,
        "compile_seconds": compile_seconds,
        "steps": dyn.steps,
        "final_train_loss": float(out.losses[-1]),
        **sizes,
        **extras,
    }
    return HypergradResult(value, grad, out.params, stats)
