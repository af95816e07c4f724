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

Multi-level checkpointing, ``checkpoint_every=(k_1, ..., k_L)`` with k_1 > ... > k_L, nests the
segments: the run is a scan of remat-segments of k_1 steps, each of them a scan of remat-segments
of k_2 steps, and so on. The backward pass keeps T/k_1 + k_1/k_2 + ... + k_L states and recomputes
each level once: memory ~(T/k_1 + Σ k_i/k_{i+1} + k_L)·d for L extra forward passes. With
k_i ≈ T^((L+1-i)/(L+1)) that is ~(L+1)·T^(1/(L+1))·d, and with L ≈ log2 T levels of ratio 2, ~2·log2(T)·d.

On the way back the norm of every α_t's weight part is measured (a probe whose cotangent is ‖α_t‖):
``stats["backward_growth"]`` = max_t ‖α_t‖ / ‖α_T‖. Past ``CHAOS_GROWTH`` the run is chaotic
in its weights and the hypergradient measures that chaos; :func:`hypergradient.hypergrad` warns.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from .._checks import is_int
from .._pytree import is_inexact, tree_norm
from ..dynamics import model_state
from ..errors import ChaosWarning, Failure
from . import adjoint, second_order
from .base import Method, Trained, solution

#: A backward pass that grows more than this (max ‖α_t‖ / ‖α_T‖) is reported as chaotic.
CHAOS_GROWTH = 1e8


@dataclasses.dataclass(frozen=True)
class Reverse(Method):
    """Reverse-mode hypergradient, optionally with checkpointing.

    Args:
      checkpoint_every: store the state every k steps and recompute the
        segments between on the backward pass (``None``: store everything);
        a decreasing tuple ``(k_1, ..., k_L)`` nests L levels of segments.
      adjoint_dtype: keep the backward recursion α_t in this dtype (``jnp.float32`` for a
        bfloat16 run): each step is differentiated as a copy traced in it, at the run's stored
        states (``hypergradient/methods/adjoint.py``); ``None``: plain autodiff, in the run's dtypes.
      second_order: how each backward step takes the products with the training loss's Hessian
        that differentiating its gradient needs. ``"reverse"``: plain autodiff of the step
        (reverse-over-reverse), which keeps the gradient's own backward pass. ``"forward"``:
        a Jacobian-vector product of the gradient (forward-over-reverse, MixFlow-MG), which keeps
        only the step's inputs and recomputes the gradient on the way back: less memory for a
        wide model, whose activations dominate, for about one more gradient per step
        (``hypergradient/methods/second_order.py``). ``"auto"``: the one whose program XLA
        says needs less temporary memory, unless it needs over ``MUCH_SLOWER`` (1.5) times the
        other's operations; chosen once per problem shapes. The same hypergradient either way.
    """

    checkpoint_every: int | tuple[int, ...] | None = None
    adjoint_dtype: Any = None
    second_order: str = "reverse"

    def __post_init__(self):
        if self.second_order not in second_order.MODES:
            raise ValueError(f"second_order must be one of {', '.join(map(repr, second_order.MODES))}; "
                             f"got {self.second_order!r}")
        if self.adjoint_dtype is not None:
            object.__setattr__(self, "adjoint_dtype", adjoint.check_dtype(self.adjoint_dtype, self.checkpoint_every))
        k = self.checkpoint_every
        if k is None:
            return
        ks = k if isinstance(k, tuple) else (k,)
        if not (ks and all(is_int(x) and x >= 1 for x in ks) and all(a > b for a, b in zip(ks, ks[1:]))):
            raise ValueError(
                f"checkpoint_every must be a positive int, a strictly decreasing tuple of them, or None; got {k!r}"
            )
        object.__setattr__(self, "checkpoint_every", tuple(map(int, ks)) if isinstance(k, tuple) else int(k))

    @property
    def levels(self) -> tuple[int, ...]:
        """The segment lengths, outermost first (``()``: no checkpointing)."""
        k = self.checkpoint_every
        return () if k is None else k if isinstance(k, tuple) else (k,)

    def resolve(self, dyn, lam, objective=None):
        """With ``second_order="auto"``, this method with the mode chosen (from the shapes alone)."""
        if self.second_order != "auto":
            return self
        return dataclasses.replace(self, second_order=second_order.choose(self, dyn, objective, lam))

    def value_and_grad(self, dyn, objective, lam):
        if self.second_order == "auto":  # under jit or vmap: chosen from the shapes, with ½‖w_T‖²
            return self.resolve(dyn, lam).value_and_grad(dyn, objective, lam)
        step = second_order.step_function(dyn, self.second_order), second_order.policy(self.second_order)
        if self.adjoint_dtype is not None:
            return adjoint.value_and_grad(dyn, objective, lam, self.adjoint_dtype, self.checkpoint_every, step[0])

        def f(lam, probes):
            state, losses = rollout(step, dyn.initial_state(lam), lam, 0, dyn.steps, self.levels, probes)
            state = _probe_weights(state, probes[-1])
            return objective(state, lam), (Trained(state.params, model_state(state)), losses)

        probes = jnp.zeros(dyn.steps + 1, jax.tree.leaves(lam)[0].dtype)
        (value, (final, losses)), (grad, norms) = jax.value_and_grad(f, (0, 1), has_aux=True)(lam, probes)
        growth = backward_growth(norms)
        result = jnp.where(growth > CHAOS_GROWTH, Failure.CHAOTIC, Failure.OK)
        return solution(value, grad, final, losses, {"backward_growth": growth}, result)

    def failure(self, result, stats):
        if result != Failure.CHAOTIC:
            return None
        return ChaosWarning(
            f"the backward pass {grew(stats['backward_growth'])} (largest ‖α_t‖ against ‖α_T‖): the training "
            "run is chaotic in its weights, and this hypergradient measures that chaos rather than a trend in λ; "
            "hg.smoothness(dyn, objective, λ) compares it with the objective's slopes; use a shorter horizon, "
            "hg.Truncated(k), a smaller learning rate, or an evolution-strategy estimator of the smoothed "
            "objective (hg.ES, hg.PES), which needs no backward pass"
        )


def grew(growth) -> str:
    """``growth`` in words: "grew 1.2e+06x", or "overflowed" where it is not finite."""
    growth = float(growth)
    return f"grew {growth:.3g}x" if math.isfinite(growth) else "overflowed"


def backward_growth(norms):
    """max_t ‖α_t‖ / ‖α_T‖ from the probes' cotangents (1 when α_T = 0)."""
    last = norms[-1]
    return jnp.where(last > 0, jnp.max(norms) / jnp.where(last > 0, last, 1), 1.0)


@jax.custom_vjp
def probe(state, p):
    """The identity on ``state``, whose cotangent for ``p`` is the norm of the state's cotangent."""
    return state


def _probe_fwd(state, p):
    return state, jnp.zeros_like(p)


def _probe_bwd(zero, alpha):
    norm = tree_norm([a.astype(zero.dtype) for a in jax.tree.leaves(alpha) if is_inexact(a)])
    return alpha, norm.astype(zero.dtype)


probe.defvjp(_probe_fwd, _probe_bwd)


def _probe_weights(state, p):
    """The probe on the weights' part of s_t: their cotangent is where chaos shows (‖α_t‖ of the
    optimizer state follows it), at half the cost of the whole state."""
    return state._replace(params=probe(state.params, p))


def _scan(step, state, lam, start, length: int, probes):
    """``dyn.rollout`` with a probe before every step, ``step = (Φ, policy)``: ``Φ(s, λ, t)``,
    whose steps save for the backward pass only what ``policy`` lets them."""
    fn, policy = step
    saved = jax.checkpoint(lambda s, t: fn(s, lam, t), policy=policy, prevent_cse=False)
    return jax.lax.scan(lambda s, tp: saved(_probe_weights(s, tp[1]), tp[0]), state,
                        (start + jnp.arange(length), probes))


def remat_rollout(dyn, state, lam, start, length: int):
    """``dyn.rollout`` whose steps save only matrix-product outputs for the backward pass (the
    memory per step of Reverse, for methods that differentiate a rollout themselves)."""
    step = jax.checkpoint(lambda s, t: dyn.step(s, lam, t), policy=jax.checkpoint_policies.dots_saveable,
                          prevent_cse=False)
    return jax.lax.scan(step, state, start + jnp.arange(length))


def rollout(step, state, lam, start: int, length: int, levels: tuple[int, ...], probes):
    """The run of ``step = (Φ, policy)`` from ``start`` for ``length`` steps, remat-segmented every
    ``levels[0]`` steps, each segment remat-segmented every ``levels[1]`` steps, and so on;
    ``probes[i]`` measures α before step ``start + i``."""
    ks = tuple(k for k in levels if k < length)  # a segment as long as the run is no segment
    if not ks:
        return _scan(step, state, lam, start, length, probes[:length])
    k, inner = ks[0], ks[1:]
    n_seg, rest = divmod(length, k)

    @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan CSE cannot merge the recomputation
    def segment(s, lam, seg_start, seg_probes):
        return rollout(step, s, lam, seg_start, k, inner, seg_probes)

    def body(s, i_p):
        i, p = i_p
        return segment(s, lam, start + i * k, p)

    state, losses = jax.lax.scan(body, state, (jnp.arange(n_seg), probes[: n_seg * k].reshape(n_seg, k)))
    losses = losses.reshape(-1)
    if rest:
        state, tail = rollout(step, state, lam, start + n_seg * k, rest, inner, probes[n_seg * k : length])
        losses = jnp.concatenate([losses, tail])
    return state, losses
