"""Forward-HG: carry the tangent of the state along the training run.

Franceschi et al. (2017), Algorithm "Forward-HG":

    Z_0 = ∂s_0/∂λ,   Z_t = A_t Z_{t-1} + B_t,   ∇f = ∂E/∂s_T · Z_T + ∂E/∂λ

All m tangent directions travel together through one pass (forward-mode
autodiff, vectorised over the basis of λ), so memory is m·d and no
trajectory is stored; time grows with m.
"""

from __future__ import annotations

import dataclasses

import jax

from .base import Method, Outputs


@dataclasses.dataclass(frozen=True)
class Forward(Method):
    """Forward-mode hypergradient (all hyperparameter directions at once)."""

    def value_and_grad(self, dyn, objective, lam):
        def f(lam):
            state, losses = dyn.rollout(dyn.initial_state(lam), lam, 0, dyn.steps)
            value = objective(state.params, lam)
            return value, (value, state.params, losses)

        grad, (value, params, losses) = jax.jacfwd(f, has_aux=True)(lam)
        return value, grad, Outputs(params, losses, {})
