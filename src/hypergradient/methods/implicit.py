"""Implicit differentiation at a stationary point of the training loss.

If training converges, w_T ≈ w*(λ) with ∇_w L(w*, λ) = 0, and the implicit
function theorem gives, with H = ∇²_w L and v solving H v = ∂E/∂w,

    ∇f = ∂E/∂λ − (∂²L/∂λ∂w)ᵀ v.

The training run is executed but not differentiated: memory ~d, time one run
plus the linear solve (Hessian-vector products). Exact when w_T is a
stationary point, biased otherwise (and blind to hyperparameters that do not
move the stationary point, such as learning rates). Solvers:

- ``"cg"``: conjugate gradients on H v = ∂E/∂w (H must be positive definite);
- ``"neumann"``: v ≈ α Σ_{k<iters} (I − αH)^k ∂E/∂w, with step ``alpha``
  (default 1/λ_max(H), estimated by power iteration).

Both assumptions are measured on every call and reported in ``stats``:
``stationarity`` = ‖∇_w L(w_T)‖ / ‖∇_w L(w_0)‖ and ``solve_residual`` =
‖H v − ∂E/∂w‖ / ‖∂E/∂w‖. Past their tolerances :func:`hypergradient.hypergrad`
warns (:class:`~hypergradient.errors.ImplicitWarning`), or raises with ``strict=True``.

The stationarity condition uses the training loss on the whole training set:
the fixed batch of the dynamics, or all the arrays of its ``Batches``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._checks import check_int
from .._pytree import tree_norm
from ..errors import Failure, ImplicitWarning, MethodError
from .base import Method, solution

SOLVERS = ("cg", "neumann")
POWER_ITERATIONS = 20


def full_batch(dyn):
    """The batch on which the training loss is stationary: every training example."""
    try:
        return dyn.batches.examples
    except AttributeError:
        raise MethodError(
            "Implicit needs the whole training set to state stationarity: give the dynamics a fixed batch or "
            "hg.Batches, not a plain function of the step; or use hg.Reverse() / hg.Forward()"
        ) from None


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@dataclasses.dataclass(frozen=True)
class Implicit(Method):
    """Implicit-function-theorem hypergradient at the final weights.

    Args:
      solver: ``"cg"`` or ``"neumann"``.
      iters: iterations of the linear solver.
      tol: relative tolerance for ``"cg"``.
      alpha: step of the Neumann series (below 2 / largest Hessian eigenvalue);
        ``None``: 1 / the largest eigenvalue, by power iteration.
      stationarity_tol: largest ``stationarity`` (gradient at w_T relative to w_0) trusted.
      solve_tol: largest ``solve_residual`` trusted.
      strict: raise :class:`~hypergradient.MethodError` instead of warning when a tolerance is passed.
    """

    solver: str = "cg"
    iters: int = 100
    tol: float = 1e-10
    alpha: float | None = None
    stationarity_tol: float = 1e-3
    solve_tol: float = 1e-3
    strict: bool = False

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"Implicit(solver=...) must be one of {SOLVERS}, got {self.solver!r}")
        check_int("Implicit(iters=...)", self.iters)

    def check(self, dyn):
        if dyn.carries_state or dyn.key is not None:
            raise MethodError(
                "Implicit states stationarity of one deterministic training loss, and this run's loss "
                f"{'carries a model state' if dyn.carries_state else 'draws a new key every step'}: use hg.Reverse "
                "(checkpoint_every=...), hg.Forward() or hg.Truncated(k)"
            )
        full_batch(dyn)

    def failure(self, result, stats):
        if result == Failure.NOT_STATIONARY:
            message = (
                f"Implicit: w_T is not a stationary point of the training loss (gradient reduced to "
                f"{stats['stationarity']:.3g} of its initial norm, tolerance {self.stationarity_tol:g}); the "
                "implicit hypergradient assumes convergence and may be far off: train longer, or use "
                "hg.Reverse(checkpoint_every=...) / hg.Forward()"
            )
        elif result == Failure.SOLVE_NOT_CONVERGED:
            message = (
                f"Implicit: the {self.solver} solve of H v = ∂E/∂w stopped at relative residual "
                f"{stats['solve_residual']:.3g} (tolerance {self.solve_tol:g}); raise iters"
                + (" or give a smaller alpha" if self.solver == "neumann" else "")
                + ", or check that the Hessian is positive definite at w_T"
            )
        else:
            return None
        return MethodError(message) if self.strict else ImplicitWarning(message)

    def value_and_grad(self, dyn, objective, lam):
        s0 = dyn.initial_state(lam)
        state, losses = dyn.rollout(s0, lam, 0, dyn.steps)
        w = state.params
        batch = full_batch(dyn)
        value, (dE_dw, dE_dlam) = jax.value_and_grad(objective, argnums=(0, 1))(w, lam)

        def grad_w(w, lam):
            return jax.grad(lambda w: dyn.train_loss(w, lam, batch)[0])(w)

        def hvp(v):
            return jax.jvp(lambda w: grad_w(w, lam), (w,), (v,))[1]

        if self.solver == "cg":
            v, _ = jax.scipy.sparse.linalg.cg(hvp, dE_dw, tol=self.tol, maxiter=self.iters)
        else:
            alpha = self.alpha if self.alpha is not None else 1.0 / _largest_eigenvalue(hvp, dE_dw)

            def body(_, carry):
                term, total = carry
                term = jax.tree.map(lambda t, h: t - alpha * h, term, hvp(term))
                return term, jax.tree.map(jnp.add, total, term)

            _, total = jax.lax.fori_loop(0, self.iters - 1, body, (dE_dw, dE_dw))
            v = jax.tree.map(lambda x: alpha * x, total)

        _, cross = jax.vjp(lambda lam: grad_w(w, lam), lam)
        (mixed,) = cross(v)
        grad = jax.tree.map(lambda a, b: a - b, dE_dlam, mixed)
        g_T = tree_norm(grad_w(w, lam))
        tiny = jnp.finfo(g_T.dtype).tiny
        stationarity = g_T / jnp.maximum(tree_norm(grad_w(s0.params, lam)), tiny)
        residual = tree_norm(jax.tree.map(jnp.subtract, hvp(v), dE_dw)) / jnp.maximum(tree_norm(dE_dw), tiny)
        result = jnp.where(stationarity > self.stationarity_tol, Failure.NOT_STATIONARY,
                           jnp.where(residual > self.solve_tol, Failure.SOLVE_NOT_CONVERGED, Failure.OK))
        stats = {"grad_norm_at_wT": g_T, "stationarity": stationarity, "solve_residual": residual}
        return solution(value, grad, w, losses, stats, result)


def _largest_eigenvalue(hvp, like):
    """λ_max of the Hessian by power iteration from a fixed pseudo-random start."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    v = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])

    def step(_, v):
        hv = hvp(v)
        return jax.tree.map(lambda x: x / tree_norm(hv), hv)

    v = jax.lax.fori_loop(0, POWER_ITERATIONS, step, jax.tree.map(lambda x: x / tree_norm(v), v))
    return _vdot(v, hvp(v))
