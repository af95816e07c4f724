"""The two entry points: :func:`value_and_grad`, pure and traceable, and :func:`hypergrad`, the
host-side convenience on top of it (compile cache, timings, XLA's memory figures, errors raised).

    sol = hg.value_and_grad(dyn, objective, λ, method)          # inside jit / vmap / your code
    res = hg.hypergrad(dyn, objective, λ, method)               # on the host: raises on failure
"""

from __future__ import annotations

import collections
import time
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._lam_checks import check_fits
from ._pytree import nbytes, partition, signature
from .dynamics import Dynamics, check_finite, first_nonfinite, model_state, train
from .errors import DivergenceError, Failure
from .methods.base import Method, Objective, Solution
from .methods.reverse import Reverse
from .precision import library_precision, matmul_precision


def value_and_grad(dyn: Dynamics, objective: Objective, lam, method: Method | None = None) -> Solution:
    """f(λ) = objective(w_T(λ), λ) and its hypergradient ∇f(λ), as a pure function.

    Composes with ``jax.jit``, ``jax.vmap`` (over λ, or over the arrays a Dynamics or a
    callable-pytree objective holds) and sharding. Nothing is raised for a run that fails:
    ``Solution.diverged`` and ``Solution.result`` say what went wrong (see :func:`hypergrad`
    for the raising host version). Float32 products run at full precision unless JAX's
    ``default_matmul_precision`` says otherwise (:mod:`hypergradient.precision`).

    Args:
      dyn: the training run.
      objective: ``(w, λ) -> scalar`` at the final weights (``(w, λ, state=s_T)`` for a run given
        ``state=``); any callable pytree (a ``jax.tree_util.Partial`` holding the validation
        arrays, an Equinox module).
      lam: the hyperparameters, a pytree of floating-point arrays.
      method: how to differentiate (default ``hg.Reverse()``); see :class:`~hypergradient.Method`.

    Returns:
      A :class:`~hypergradient.Solution` (``value``, ``grad``, ``params``, ``losses``,
      ``diverged``, ``result``, ``stats``).
    """
    method = Reverse() if method is None else method
    check_types(dyn, method)
    if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(lam)):
        method = method.resolve(dyn, lam, objective)
    with library_precision():
        sol = method.value_and_grad(dyn, lambda final, lam: dyn.objective_at(objective, final, lam), lam)
    train_ok = jnp.all(jnp.isfinite(sol.losses))
    value_ok = jnp.isfinite(sol.value)
    grad_ok = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(sol.grad)]))
    result = jnp.where(
        sol.result != Failure.OK, sol.result,
        jnp.where(~train_ok, Failure.TRAINING_DIVERGED,
                  jnp.where(~value_ok, Failure.OBJECTIVE_NONFINITE,
                            jnp.where(~grad_ok, Failure.GRAD_NONFINITE, Failure.OK))),
    ).astype(jnp.int32)
    return sol._replace(diverged=~(train_ok & value_ok & grad_ok), result=result)


class HypergradResult(NamedTuple):
    """Result of :func:`hypergrad`.

    Attributes:
      value: f(λ), the objective at the final weights.
      grad: ∇f(λ), with λ's structure.
      params: the final weights w_T of the training run (the whole model when ``init`` was one).
      stats: host numbers: ``method`` (what ran), ``seconds``, ``compile_seconds``, ``steps``,
        ``final_train_loss``, ``temp_bytes`` (XLA's peak temporary memory), ``state_bytes``,
        ``hparam_numbers`` and the method's own figures.
      losses: the training loss of every step.
      state: the model state at the end of the run (``Dynamics(state=...)``; an NNX module's is
        inside ``params``), ``None`` for a run without one.
    """

    value: jax.Array
    grad: Any
    params: Any
    stats: dict
    losses: jax.Array
    state: Any = None


def hypergrad(dyn: Dynamics, objective: Objective, lam, method: Method | None = None) -> HypergradResult:
    """The hypergradient ∇f(λ) of f(λ) = objective(w_T(λ), λ), computed on the host.

    Args:
      dyn: the training run.
      objective: ``(w, λ) -> scalar``, evaluated at the final weights; a callable pytree's arrays
        are arguments of the compiled program, never constants baked into it.
      lam: the hyperparameters, a pytree of floating-point arrays.
      method: how to differentiate: ``hg.Reverse()`` (default, optionally with
        ``checkpoint_every``), ``hg.Forward()``, ``hg.Truncated(k)``, ``hg.Reversible()``,
        ``hg.DrMAD()`` or ``hg.Implicit()``.

    Returns:
      A :class:`HypergradResult`. The compiled program is reused by later calls with the same
      dynamics functions, objective functions, method and shapes.

    Raises:
      DivergenceError: the training loss, the objective or the hypergradient is NaN or inf
        (the error names the first non-finite training step).
      MethodError: the method cannot serve this dynamics (``ReversalError``: Reversible could not
        reverse this run exactly; ``Implicit(strict=True)``: w_T is not stationary or the linear
        solve did not converge).

    Warns:
      ImplicitWarning: ``Implicit`` at a point that is not stationary, or with a solve that did
        not converge (see its ``stats["stationarity"]`` and ``stats["solve_residual"]``).
    """
    method = Reverse() if method is None else method
    check_types(dyn, method)
    check_finite(lam, "hyperparameter")
    method = method.resolve(dyn, lam, objective)
    exe, compile_seconds, sizes = compiled(dyn, objective, method, lam)
    arrays, _ = partition(objective)
    start = time.perf_counter()
    sol = jax.block_until_ready(exe(dyn, arrays, lam))
    seconds = time.perf_counter() - start
    stats = {k: np.asarray(v).item() for k, v in sol.stats.items()}
    raise_failure(method, Failure(int(sol.result)), stats, sol, dyn.steps,
                  locate=lambda: nonfinite_origin(dyn, objective, lam))
    stats = {
        "method": repr(method),
        "seconds": seconds,
        "compile_seconds": compile_seconds,
        "steps": dyn.steps,
        "final_train_loss": float(np.asarray(sol.losses)[-1]),
        **sizes,
        **stats,
    }
    return HypergradResult(sol.value, sol.grad, dyn.model(sol.params, sol.state), stats, sol.losses, sol.state)


def raise_failure(method: Method, result: Failure, stats: dict, sol: Solution, steps: int, locate=None) -> None:
    """Raise the exception that names ``result`` (warn instead for a method's caveat; nothing for
    ``Failure.OK``); ``locate()`` names where a non-finite hypergradient came from."""
    error = method.failure(result, stats) if result != Failure.OK else None
    if isinstance(error, Warning):  # the result stands, with a caveat, unless it diverged
        warnings.warn(error, stacklevel=3)
    elif error is not None:
        raise error
    if not bool(sol.diverged):
        return
    step = first_nonfinite(sol.losses)
    if step is not None:
        raise DivergenceError(f"training diverged: the training loss is not finite at step {step} of {steps}", step)
    if not np.isfinite(float(sol.value)):
        raise DivergenceError(f"training stayed finite but the objective is not (value {float(sol.value)}); "
                              "check the objective and the scale of λ")
    origin = locate() if locate is not None else None
    where = (f": on the backward pass, α_t first became non-finite at training step {origin[0]}, in the state's "
             f"{origin[1]}" if origin else "")
    raise DivergenceError(
        f"training stayed finite but the hypergradient is not (value {float(sol.value)}){where}; check the scale of "
        "λ, for adaptive optimizers a weight whose gradient is exactly zero (the derivative of the square root at 0), "
        "and whether the run is chaotic (hg.smoothness(dyn, objective, λ)), where the derivative overflows and an "
        "evolution-strategy estimator, hg.ES (hg.PES in hg.online), needs none"
    )


def nonfinite_origin(dyn: Dynamics, objective: Objective, lam) -> tuple[int, str] | None:
    """Where the Reverse-HG recursion α_{t-1} = α_t A_t first produces NaN or inf: ``(t, part of
    the state)``, or None. A diagnosis after a failure: it stores the trajectory (T·d memory)."""
    state0 = jax.eval_shape(dyn.initial_state, lam)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state0)[0]]
    floating = [jnp.issubdtype(x.dtype, jnp.inexact) for x in jax.tree.leaves(state0)]

    @jax.jit
    def flags(dyn, lam):
        def forward(s, t):
            return dyn.step(s, lam, t)[0], s

        s_T, states = jax.lax.scan(forward, dyn.initial_state(lam), jnp.arange(dyn.steps))
        alpha = jax.grad(lambda s: dyn.objective_at(objective, s, lam), allow_int=True)(s_T)

        def backward(alpha, t_s):
            t, s = t_s
            _, vjp = jax.vjp(lambda s: dyn.step(s, lam, t)[0], s)
            (alpha,) = vjp(alpha)
            ok = [jnp.all(jnp.isfinite(a)) if f else jnp.asarray(True) for a, f in zip(jax.tree.leaves(alpha), floating)]
            return alpha, jnp.stack(ok)

        return jax.lax.scan(backward, alpha, (jnp.arange(dyn.steps), states), reverse=True)[1]

    try:
        ok = np.asarray(flags(dyn, lam))
    except Exception:  # a diagnosis must not hide the error it explains
        return None
    for t in range(ok.shape[0] - 1, -1, -1):
        if not ok[t].all():
            return t, paths[int(np.argmin(ok[t]))]
    return None


def check_types(dyn, method) -> None:
    """The method is a hypergradient method and the dynamics a Dynamics (a TypeError naming which is not)."""
    if not isinstance(method, Method):
        raise TypeError(f"method must be a hypergradient method (hg.Reverse(), hg.Forward(), ...), got {method!r}")
    if not isinstance(dyn, Dynamics):
        raise TypeError(f"dyn must be a hypergradient.Dynamics, got {type(dyn).__name__}")


def check_objective(dyn: Dynamics, objective: Objective, lam) -> None:
    """The objective must map (w_T, λ) to a real scalar."""
    if not callable(objective):
        raise TypeError("objective must be a function (w, λ) -> scalar")
    out = jax.eval_shape(lambda lam: dyn.objective_at(objective, dyn.initial_state(lam), lam), lam)
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

    def get_or_build(self, key, build):
        """The program stored under ``key``, or ``build()`` stored there now."""
        hit = self.get(key)
        return hit if hit is not None else self.put(key, build())


_programs = ProgramCache(64)


def compiled(dyn: Dynamics, objective: Objective, method: Method, lam):
    """The compiled :func:`value_and_grad` for these arguments (method resolved first), cached.

    Returns ``(executable, compile_seconds, sizes)``; call the executable as
    ``exe(dyn, arrays, lam)`` with ``arrays, _ = partition(objective)``. ``compile_seconds`` is 0
    on a hit; ``sizes`` holds XLA's peak temporary memory (``temp_bytes``, -1 if unknown), the
    bytes of one training state and the number of hyperparameters.
    """
    method = method.resolve(dyn, lam, objective)  # a no-op when hypergrad has resolved it already
    arrays, skeleton = partition(objective)
    key = (signature(dyn), skeleton, signature(arrays), method, signature(lam), matmul_precision())
    hit = _programs.get(key)
    if hit is not None:
        return hit[0], 0.0, hit[1]
    dyn.validate(lam)
    dyn.check_finite()
    check_objective(dyn, objective, lam)
    check_fits(dyn, lambda final, lam: dyn.objective_at(objective, final, lam), lam)
    method.check(dyn)
    start = time.perf_counter()
    program = jax.jit(lambda d, a, l: value_and_grad(d, skeleton.combine(a), l, method))
    exe = program.lower(dyn, arrays, lam).compile()
    seconds = time.perf_counter() - start
    sizes = {
        "temp_bytes": temp_bytes(exe),
        "state_bytes": nbytes(jax.eval_shape(dyn.initial_state, lam)),
        "hparam_numbers": sum(int(np.size(x)) for x in jax.tree.leaves(lam)),
    }
    _programs.put(key, (exe, sizes))
    return exe, seconds, sizes


def temp_bytes(exe) -> int:
    """XLA's peak temporary memory of a compiled program (-1 if the backend does not say)."""
    memory = exe.memory_analysis()
    return int(getattr(memory, "temp_size_in_bytes", -1)) if memory is not None else -1


_evaluations = ProgramCache(64)


def trained_objective(dyn: Dynamics, objective: Objective, lam):
    """Traceable: ``((w_T's trained arrays, model state), objective at s_T, per-step losses)``."""
    with library_precision():
        state, losses = train(dyn, lam)
        return (state.params, model_state(state)), dyn.objective_at(objective, state, lam), losses


def evaluate(dyn: Dynamics, objective: Objective, lam):
    """Plain training at λ and the objective there: ``(w_T, f(λ), losses, model state at T)``, nothing
    differentiated; compiled once per problem like :func:`compiled`, nothing raised."""
    arrays, skeleton = partition(objective)
    key = (signature(dyn), skeleton, signature(arrays), signature(lam), matmul_precision())
    program = _evaluations.get_or_build(
        key, lambda: jax.jit(lambda d, a, l: trained_objective(d, skeleton.combine(a), l)))
    (params, held), value, losses = program(dyn, arrays, lam)
    return dyn.model(params, held), value, losses, held
