"""Reverse-HG: backpropagation through the whole training run.

Franceschi et al. (2017), Algorithm "Reverse-HG":

    α_T = ∂E/∂s_T,  g = ∂E/∂λ
    for t = T..1:   g += α_t B_t,   α_{t-1} = α_t A_t
    g += α_0 ∂s_0/∂λ

with A_t = ∂Φ_t/∂s_{t-1}, B_t = ∂Φ_t/∂λ. Reverse-mode autodiff of the
``lax.scan`` computes exactly this, storing the states (and each step's
residuals) of the forward pass: memory ~T·d. With ``checkpoint_every=k``
only every k-th state is stored and each segment of k steps is recomputed
on the way back: memory ~(T/k + k)·d for one extra forward pass.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .base import Method, solution


@dataclasses.dataclass(frozen=True)
class Reverse(Method):
    """Reverse-mode hypergradient, optionally with checkpointing.

    Args:
      checkpoint_every: store the state every k steps and recompute the
        segments between on the backward pass (``None``: store everything).
    """

    checkpoint_every: int | None = None

    def __post_init__(self):
        k = self.checkpoint_every
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"checkpoint_every must be a positive int or None, got {k!r}")

    def value_and_grad(self, dyn, objective, lam):
        def f(lam):
            state, losses = rollout(dyn, dyn.initial_state(lam), lam, 0, dyn.steps, self.checkpoint_every)
            return objective(state.params, lam), (state.params, losses)

        (value, (params, losses)), grad = jax.value_and_grad(f, has_aux=True)(lam)
        return solution(value, grad, params, losses)


def _scan(dyn, state, lam, start, length: int):
    """``dyn.rollout`` whose steps save only matrix-product outputs for the backward pass."""
    step = jax.checkpoint(
        lambda s, t: dyn.step(s, lam, t), policy=jax.checkpoint_policies.dots_saveable, prevent_cse=False
    )
    return jax.lax.scan(step, state, start + jnp.arange(length))


def rollout(dyn, state, lam, start: int, length: int, checkpoint_every: int | None):
    """The run from ``start`` for ``length`` steps, remat-segmented every ``checkpoint_every`` steps."""
    k = checkpoint_every
    if k is None or k >= length:
        return _scan(dyn, state, lam, start, length)
    n_seg, rest = divmod(length, k)

    @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan CSE cannot merge the recomputation
    def segment(s, lam, seg_start):
        return _scan(dyn, s, lam, seg_start, k)

    def body(s, i):
        return segment(s, lam, start + i * k)

    state, losses = jax.lax.scan(body, state, jnp.arange(n_seg))
    losses = losses.reshape(-1)
    if rest:
        state, tail = _scan(dyn, state, lam, start + n_seg * k, rest)
        losses = jnp.concatenate([losses, tail])
    return state, losses
