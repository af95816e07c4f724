"""Truncated reverse: backpropagate through the last k steps only.

    s_{T-k} = Φ_{T-k}∘…∘Φ_1(s_0)   (run, not differentiated)
    ∇f ≈ Reverse-HG over steps T-k+1..T, starting from s_{T-k} held fixed

Memory ~k·d; the estimate is biased towards short horizons (Shaban et al.
2019; TRHO in Franceschi et al. 2017 when used in real time). With k = T it
is Reverse-HG exactly, including the path through s_0 = init(λ).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .base import Method, Outputs


@dataclasses.dataclass(frozen=True)
class Truncated(Method):
    """Reverse mode through the last ``k`` training steps.

    Args:
      k: the number of final steps differentiated (``k >= steps`` is Reverse).
    """

    k: int

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"Truncated(k) needs a positive int k, got {self.k!r}")

    def value_and_grad(self, dyn, objective, lam):
        k = min(self.k, dyn.steps)
        head = dyn.steps - k

        def f(lam, state):
            if head == 0:
                state = dyn.initial_state(lam)
            state, losses = dyn.rollout(state, lam, head, k)
            return objective(state.params, lam), (state.params, losses)

        state, head_losses = dyn.rollout(dyn.initial_state(lam), lam, 0, head) if head else (None, None)
        (value, (params, losses)), grad = jax.value_and_grad(f, has_aux=True)(lam, state)
        if head:
            losses = jnp.concatenate([head_losses, losses])
        return value, grad, Outputs(params, losses, {"truncation": k})
