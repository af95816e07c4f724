"""Implicit differentiation at a stationary point of the training loss.

If training converges, w_T ≈ w*(λ) with ∇_w L(w*, λ) = 0, and the implicit
function theorem gives, with H = ∇²_w L and v solving H v = ∂E/∂w,

    ∇f = ∂E/∂λ − (∂²L/∂λ∂w)ᵀ v.

The training run is executed but not differentiated: memory ~d, time one run
plus the linear solve (Hessian-vector products). Exact when w_T is a
stationary point, biased otherwise (and blind to hyperparameters that do not
move the stationary point, such as learning rates). Solvers:

- ``"cg"``: conjugate gradients on H v = ∂E/∂w (H must be positive definite);
- ``"neumann"``: v ≈ α Σ_{k<iters} (I − αH)^k ∂E/∂w, with step ``alpha``.

The stationarity condition uses the training loss on the whole training set:
the fixed batch of the dynamics, or all the arrays of its ``Batches``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..data import Batches
from ..errors import MethodError
from .base import Method, solution

SOLVERS = ("cg", "neumann")


def full_batch(dyn):
    """The batch on which the training loss is stationary."""
    if isinstance(dyn.data, Batches):
        return dyn.data.arrays
    if not callable(dyn.data):
        return dyn.data
    raise MethodError(
        "Implicit needs the whole training set to state stationarity: give the dynamics a fixed batch or "
        "hg.Batches, not a plain function of the step; or use hg.Reverse() / hg.Forward()"
    )


def _tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@dataclasses.dataclass(frozen=True)
class Implicit(Method):
    """Implicit-function-theorem hypergradient at the final weights.

    Args:
      solver: ``"cg"`` or ``"neumann"``.
      iters: iterations of the linear solver.
      tol: relative tolerance for ``"cg"``.
      alpha: step of the Neumann series (below 2 / largest Hessian eigenvalue).
    """

    solver: str = "cg"
    iters: int = 100
    tol: float = 1e-10
    alpha: float = 0.1

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"Implicit(solver=...) must be one of {SOLVERS}, got {self.solver!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"Implicit(iters=...) must be a positive int, got {self.iters!r}")

    def check(self, dyn):
        full_batch(dyn)

    def value_and_grad(self, dyn, objective, lam):
        state, losses = dyn.rollout(dyn.initial_state(lam), lam, 0, dyn.steps)
        w = state.params
        batch = full_batch(dyn)
        value, (dE_dw, dE_dlam) = jax.value_and_grad(objective, argnums=(0, 1))(w, lam)

        def grad_w(w, lam):
            return jax.grad(dyn.train_loss)(w, lam, batch)

        def hvp(v):
            return jax.jvp(lambda w: grad_w(w, lam), (w,), (v,))[1]

        if self.solver == "cg":
            v, _ = jax.scipy.sparse.linalg.cg(hvp, dE_dw, tol=self.tol, maxiter=self.iters)
        else:
            def body(_, carry):
                term, total = carry
                term = jax.tree.map(lambda t, h: t - self.alpha * h, term, hvp(term))
                return term, jax.tree.map(jnp.add, total, term)

            _, total = jax.lax.fori_loop(0, self.iters - 1, body, (dE_dw, dE_dw))
            v = jax.tree.map(lambda x: self.alpha * x, total)

        _, cross = jax.vjp(lambda lam: grad_w(w, lam), lam)
        (mixed,) = cross(v)
        grad = jax.tree.map(lambda a, b: a - b, dE_dlam, mixed)
        stationarity = jnp.sqrt(_tree_vdot(grad_w(w, lam), grad_w(w, lam)))
        return solution(value, grad, w, losses, {"grad_norm_at_wT": stationarity})
