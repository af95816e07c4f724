"""Truncated reverse: backpropagate through the last k steps only.

    s_{T-k} = Φ_{T-k}∘…∘Φ_1(s_0)   (run, not differentiated)
    ∇f ≈ Reverse-HG over steps T-k+1..T, starting from s_{T-k} held fixed

Memory ~k·d; the estimate is biased towards short horizons (Shaban et al. 2019). With k = T it
is Reverse-HG exactly, including the path through s_0 = init(λ).

In real time (TRHO, ``hg.online`` with ``Truncated(k)`` and ``every=Δ``) the same ``segment``
runs every Δ steps. With k ≤ Δ it differentiates the last k steps of the interval. With
k = rΔ it reaches back into the r − 1 intervals before, which trained under earlier
hyperparameters λ_{j-r+1}, …, λ_{j-1}: the window is run again from the state at its start,
held fixed, and differentiated with respect to a shift δ of every λ in it,

    g_j = ∂/∂δ E(Φ_{window}(s_{(j-r+1)Δ}; λ_{j-r+1} + δ, …, λ_j + δ)) at δ = 0,

the same "λ held constant over the past" derivative that RTHO's tangent carries over the whole
run, truncated to k steps. The window's state at the current interval's start is the one
training reached (the re-run only supplies its derivative), so the training trajectory is that
of a plain run under the λ schedule. Memory k·d plus r states; time ~3k/Δ× a training run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .._checks import check_int
from .._pytree import is_inexact
from .base import Segmented, solution
from .reverse import remat_rollout


class Window(NamedTuple):
    """Truncated's carry: s_t, and for k = rΔ > Δ the r − 1 intervals before it.

    ``origin`` is the state at the start of the oldest remembered interval, ``past`` the λ of
    each remembered interval (oldest first, a leading axis of r − 1), ``seen`` whether each one
    has run yet (the first r − 2 hyper-steps have fewer intervals behind them).
    """

    state: Any
    origin: Any
    past: Any
    seen: jax.Array


@dataclasses.dataclass(frozen=True)
class Truncated(Segmented):
    """Reverse mode through the last ``k`` training steps.

    Args:
      k: the number of final steps differentiated (``k >= steps`` is Reverse). In real time
        (``hg.online``) either ``k <= every`` or a multiple of ``every``.
    """

    k: int

    def __post_init__(self):
        object.__setattr__(self, "k", check_int("Truncated(k)", self.k))

    def intervals_back(self, length: int) -> int:
        """How many earlier segments of ``length`` steps the window reaches into (r − 1)."""
        if self.k <= length:
            return 0
        if self.k % length:
            raise ValueError(
                f"Truncated(k={self.k}) with segments of {length} steps: a window longer than one "
                f"segment must cover whole segments; use k <= {length} or a multiple of {length}"
            )
        return self.k // length - 1

    def start(self, dyn, lam, length: int) -> Window:
        s0 = dyn.initial_state(lam)
        back = self.intervals_back(length)
        past = jax.tree.map(lambda x: jnp.broadcast_to(x, (back,) + jnp.shape(x)), lam)
        return Window(s0, s0, past, jnp.zeros(back, bool))

    def state(self, carry: Window):
        return carry.state

    def segment(self, dyn, objective, carry: Window, lam, start, length: int):
        back = carry.seen.shape[0]
        if back == 0:
            state, value, grad, losses = self._window(dyn, objective, lambda lam: carry.state, lam, start, length)
            return Window(state, state, carry.past, carry.seen), value, grad, losses

        def f(lam):
            shift = jax.tree.map(lambda x: x - jax.lax.stop_gradient(x), lam)  # δ: zero, derivative one

            def interval(s, x):
                lam_i, seen, i = x
                lam_i = jax.tree.map(jnp.add, lam_i, shift)
                s = jax.lax.cond(seen, lambda s: dyn.rollout(s, lam_i, start - (back - i) * length, length)[0],
                                 lambda s: s, s)
                return s, s

            rerun, after = jax.lax.scan(interval, carry.origin, (carry.past, carry.seen, jnp.arange(back)))
            # the state training reached, with the re-run's derivative
            now = jax.tree.map(lambda kept, r: kept + (r - jax.lax.stop_gradient(r)) if is_inexact(kept) else kept,
                               carry.state, rerun)
            state, losses = remat_rollout(dyn, now, lam, start, length)
            origin = jax.tree.map(lambda x: x[0], after)
            return objective(state, lam), (state, losses, origin)

        (value, (state, losses, origin)), grad = jax.value_and_grad(f, has_aux=True)(lam)
        past = jax.tree.map(lambda p, x: jnp.concatenate([p[1:], x[None]]), carry.past, lam)
        seen = jnp.concatenate([carry.seen[1:], jnp.ones(1, bool)])
        return Window(state, origin, past, seen), value, grad, losses

    def value_and_grad(self, dyn, objective, lam):
        state, value, grad, losses = self._window(dyn, objective, dyn.initial_state, lam, 0, dyn.steps)
        return solution(value, grad, state, losses, {"truncation": jnp.asarray(min(self.k, dyn.steps))})

    def _window(self, dyn, objective, state_of, lam, start, length: int):
        """Run ``length`` steps from ``state_of(λ)``, differentiating the last k of them (and
        ``state_of`` itself only when the window reaches back to the segment's start)."""
        k = min(self.k, length)
        head = length - k
        if head:
            state, head_losses = dyn.rollout(state_of(lam), lam, start, head)
            state_of = lambda lam, state=state: state  # noqa: E731 (held fixed: not differentiated)

        def f(lam):
            state, losses = remat_rollout(dyn, state_of(lam), lam, start + head, k)
            return objective(state, lam), (state, losses)

        (value, (state, losses)), grad = jax.value_and_grad(f, has_aux=True)(lam)
        if head:
            losses = jnp.concatenate([head_losses, losses])
        return state, value, grad, losses
