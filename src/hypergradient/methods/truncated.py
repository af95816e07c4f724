"""Truncated reverse: backpropagate through the last k steps only.

    s_{T-k} = Φ_{T-k}∘…∘Φ_1(s_0)   (run, not differentiated)
    ∇f ≈ Reverse-HG over steps T-k+1..T, starting from s_{T-k} held fixed

Memory ~k·d; the estimate is biased towards short horizons (Shaban et al. 2019). With k = T it
is Reverse-HG exactly, including the path through s_0 = init(λ). In real time (TRHO,
``hg.online`` with ``Truncated(k)``) the same ``segment`` runs every Δ steps from the state the
previous segment left, which is held fixed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .base import Segmented, solution


@dataclasses.dataclass(frozen=True)
class Truncated(Segmented):
    """Reverse mode through the last ``k`` training steps.

    Args:
      k: the number of final steps differentiated (``k >= steps`` is Reverse).
    """

    k: int

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"Truncated(k) needs a positive int k, got {self.k!r}")

    def start(self, dyn, lam):
        return dyn.initial_state(lam)

    def state(self, carry):
        return carry

    def segment(self, dyn, objective, carry, lam, start, length: int):
        return self._window(dyn, objective, lambda lam: carry, lam, start, length)

    def value_and_grad(self, dyn, objective, lam):
        state, value, grad, losses = self._window(dyn, objective, dyn.initial_state, lam, 0, dyn.steps)
        return solution(value, grad, state.params, losses, {"truncation": jnp.asarray(min(self.k, dyn.steps))})

    def _window(self, dyn, objective, state_of, lam, start, length: int):
        """Run ``length`` steps from ``state_of(λ)``, differentiating the last k of them (and
        ``state_of`` itself only when the window reaches back to the segment's start)."""
        k = min(self.k, length)
        head = length - k
        if head:
            state, head_losses = dyn.rollout(state_of(lam), lam, start, head)
            state_of = lambda lam, state=state: state  # noqa: E731 (held fixed: not differentiated)

        def f(lam):
            state, losses = dyn.rollout(state_of(lam), lam, start + head, k)
            return objective(state.params, lam), (state, losses)

        (value, (state, losses)), grad = jax.value_and_grad(f, has_aux=True)(lam)
        if head:
            losses = jnp.concatenate([head_losses, losses])
        return state, value, grad, losses
