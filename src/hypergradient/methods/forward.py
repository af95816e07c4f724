"""Forward-HG: carry the tangent of the state along the training run.

Franceschi et al. (2017), Algorithm "Forward-HG":

    Z_0 = ∂s_0/∂λ,   Z_t = A_t Z_{t-1} + B_t,   ∇f = ∂E/∂w_T · Z_T + ∂E/∂λ

All m tangent directions travel together through one pass (forward-mode
autodiff of the run, vectorised over the basis of λ; the primal run is
computed once), so memory is m·d and no trajectory is stored; time grows
with m. The objective is differentiated once, in reverse mode, at w_T: its
cost does not grow with m.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .base import Method, Outputs


@dataclasses.dataclass(frozen=True)
class Forward(Method):
    """Forward-mode hypergradient (all hyperparameter directions at once)."""

    def value_and_grad(self, dyn, objective, lam):
        flat, unravel = ravel_pytree(lam)

        def run(lam):
            state, losses = dyn.rollout(dyn.initial_state(lam), lam, 0, dyn.steps)
            return state.params, losses

        def push(direction):  # one column of Z_T
            (params, losses), (z, _) = jax.jvp(run, (lam,), (unravel(direction),))
            return (params, losses), z

        basis = jnp.eye(flat.size, dtype=flat.dtype)
        (params, losses), z = jax.vmap(push, out_axes=((None, None), 0))(basis)
        value, (dE_dw, dE_dlam) = jax.value_and_grad(objective, argnums=(0, 1))(params, lam)
        through_w = sum(
            jnp.tensordot(zl.reshape(flat.size, -1), gl.reshape(-1), axes=1)
            for zl, gl in zip(jax.tree.leaves(z), jax.tree.leaves(dE_dw))
        )
        grad = jax.tree.map(jnp.add, unravel(through_w), dE_dlam)
        return value, grad, Outputs(params, losses, {})
