"""DrMAD: reverse mode along a straight-line approximation of the trajectory.

Fu, Luo, Yan, Zhu (2016), "DrMAD: Distilling Reverse-Mode Automatic
Differentiation for Optimizing Hyperparameters of Deep Neural Networks".
Only s_0 and s_T are kept; the backward pass runs the Reverse-HG recursion

    α_T = ∂E/∂s_T,  g = ∂E/∂λ;  for t = T..1: g += α_t B_t, α_{t-1} = α_t A_t;  g += α_0 ∂s_0/∂λ

with A_t, B_t taken at the interpolated states

    s̃_t = (1 − t/T) s_0 + (t/T) s_T

instead of the true s_t. Memory ~2d, time ~ one training run plus one
backward pass, hypergradient approximate.

Where it is good: hyperparameters whose effect accumulates smoothly over
the run and whose gradient depends on the trajectory only through its
rough location (L2 and other regularisation strengths, loss and data
weights), especially when training moves nearly in a straight line (convex
problems, small learning rates). Where it is poor: hyperparameters tied to
a particular step (learning-rate and momentum schedules, whose gradient
at step t involves the true velocity v_t, replaced here by a straight line
through v_0 = 0), and runs whose trajectory curves (large steps, oscillation).

Usable: as a cheap direction for regularisation-like hyperparameters over
runs short or smooth enough that the straight line stays where training
went (the tests: cosine > 0.9 with Reverse for L2 on a convex problem, and
on a small MLP at T = 12). Not usable: non-convex runs whose line leaves the
valley training followed and crosses curvature the run never saw. There
α_t = α_{t+1} A_t, with A_t taken off the trajectory, grows geometrically:
on B1 itself (T = 100, CPU) ‖α_t‖ grows 1.2e6x (Reverse's: 4x) and the
summed learning-rate gradient is 1.2e4 against an exact 0.10 (on a GPU
−4.7e6 against −0.167). The backward pass therefore measures its growth,
``stats["backward_growth"]`` = max_t ‖α_t‖ / ‖α_T‖ over the weights' part
of α (Reverse's figure, which also counts the optimizer's state), and a run past ``UNSTABLE_GROWTH`` fails with
``Failure.APPROXIMATION_UNSTABLE``: :func:`hypergradient.hypergrad` raises a
:class:`~hypergradient.MethodError` that advises
``hg.Reverse(checkpoint_every=...)``, the exact hypergradient in O(√T·d)
memory.

Every optimizer's state is interpolated leaf by leaf: floating leaves
linearly, integer leaves (Adam's step count) rounded, which gives the exact
count t. For Adam and RMSprop the interpolated second moments are only a
rough stand-in for the true ones; prefer hg.Reverse(checkpoint_every=...)
there when accuracy matters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._pytree import is_inexact, tree_norm
from ..errors import Failure, MethodError
from .base import Method, solution
from .reverse import backward_growth, grew

#: A backward pass that grows more than this (max ‖α_t‖ / ‖α_T‖) has left any trend the true
#: trajectory could give: the approximation has blown up. Exact backward passes of stable runs
#: grow by O(1) to O(10^2) (B1 at T = 100: 4).
UNSTABLE_GROWTH = 1e4


@dataclasses.dataclass(frozen=True)
class DrMAD(Method):
    """Approximate reverse-mode hypergradient along the straight line from s_0 to s_T (see the
    module's note on where it is usable; a blown-up backward pass is reported, not returned)."""

    def failure(self, result, stats):
        if result != Failure.APPROXIMATION_UNSTABLE:
            return None
        return MethodError(
            f"DrMAD: the backward recursion along the straight-line path {grew(stats['backward_growth'])} "
            "(largest ‖α_t‖ against ‖α_T‖): the path leaves the region training went through, and the "
            "approximate hypergradient is meaningless here; use hg.Reverse(checkpoint_every=...) (exact, "
            "memory ~(T/k + k)·d) or a shorter run"
        )

    def value_and_grad(self, dyn, objective, lam):
        T = dyn.steps
        s0 = dyn.initial_state(lam)
        sT, losses = dyn.rollout(s0, lam, 0, T)
        value, obj_vjp = jax.vjp(objective, sT, lam)
        dE_ds, grad = obj_vjp(jnp.ones_like(value))

        leaves0, treedef = jax.tree.flatten(s0)
        leavesT = treedef.flatten_up_to(sT)
        floating = [is_inexact(x) for x in leaves0]
        # the weights lead the state's leaves; growth is measured on their part of α, as an optimizer's
        # state can have huge cotangents in an exact pass too (Adam's second moment near 0)
        n_weights = sum(is_inexact(x) for x in jax.tree.leaves(s0.params))

        def interpolate(t):
            a = jnp.asarray(t, jnp.result_type(float)) / T
            out = []
            for x0, xT in zip(leaves0, leavesT):
                if jnp.issubdtype(x0.dtype, jax.dtypes.prng_key):  # a key stays; its draws are counted apart
                    out.append(x0)
                    continue
                x = (1 - a) * x0 + a * xT
                out.append(x.astype(jnp.result_type(x0)) if is_inexact(x0) else jnp.round(x).astype(jnp.result_type(x0)))
            return out

        def split(leaves):
            return [x for x, f in zip(leaves, floating) if f]

        def merge(float_leaves, all_leaves):
            it = iter(float_leaves)
            return jax.tree.unflatten(treedef, [next(it) if f else x for x, f in zip(all_leaves, floating)])

        alpha = split(treedef.flatten_up_to(dE_ds))  # ∂E/∂s_T (the optimizer state's part is zero)

        def backward(carry, t):
            alpha, grad = carry
            leaves = interpolate(t)

            def step(float_leaves, lam):
                new = dyn.step(merge(float_leaves, leaves), lam, t)[0]
                return split(treedef.flatten_up_to(new))

            _, step_vjp = jax.vjp(step, split(leaves), lam)
            norm = tree_norm(alpha[:n_weights])  # ‖α_{t+1}‖
            alpha, dlam = step_vjp(alpha)
            return (alpha, jax.tree.map(jnp.add, grad, dlam)), norm

        (alpha, grad), norms = jax.lax.scan(backward, (alpha, grad), jnp.arange(T), reverse=True)
        growth = backward_growth(jnp.concatenate([tree_norm(alpha[:n_weights])[None], norms]))  # ‖α_0‖ .. ‖α_T‖

        def init(lam):
            return split(treedef.flatten_up_to(dyn.initial_state(lam)))

        _, init_vjp = jax.vjp(init, lam)
        (dlam,) = init_vjp(alpha)
        grad = jax.tree.map(jnp.add, grad, dlam)
        state_bytes = sum(x.size * x.dtype.itemsize for x in leaves0)
        stats = {"stored_state_bytes": jnp.asarray(2 * state_bytes), "backward_growth": growth}
        result = jnp.where(growth <= UNSTABLE_GROWTH, Failure.OK, Failure.APPROXIMATION_UNSTABLE)  # NaN: unstable
        return solution(value, grad, sT, losses, stats, result)
