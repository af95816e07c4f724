"""Forward-HG: carry the tangent of the state along the training run.

Franceschi et al. (2017), Algorithm "Forward-HG":

    Z_0 = ∂s_0/∂λ,   Z_t = A_t Z_{t-1} + B_t,   ∇f = ∂E/∂s_t · Z_t + ∂E/∂λ

All m tangent directions travel together through one pass (forward-mode autodiff of the run,
vectorised over the basis of λ; the primal run is computed once), so memory is m·d and no
trajectory is stored; time grows with m. The objective is differentiated once, in reverse
mode, at the segment's end: its cost does not grow with m.

The run may stop after any segment and go on with the same tangent: RTHO (``hg.online`` with
``Forward()``) runs ``segment`` every Δ steps; a whole-run hypergradient runs it once. Integer
leaves of the state (Adam's step count) carry no tangent.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .._pytree import is_inexact
from .base import Segmented


class Tangent(NamedTuple):
    """Forward's carry: the state s_t and Z_t = ∂s_t/∂λ for its float leaves (leading axis m)."""

    state: Any
    z: list


def _split(state):
    """``(float leaves, other leaves, rebuild)``: rebuild(floats, others) is the state again."""
    leaves, treedef = jax.tree.flatten(state)
    mask = [is_inexact(x) for x in leaves]

    def rebuild(floats, others):
        fi, oi = iter(floats), iter(others)
        return jax.tree.unflatten(treedef, [next(fi) if m else next(oi) for m in mask])

    return [x for x, m in zip(leaves, mask) if m], [x for x, m in zip(leaves, mask) if not m], rebuild


def _basis(lam):
    flat, unravel = ravel_pytree(lam)
    return jax.vmap(unravel)(jnp.eye(flat.size, dtype=flat.dtype)), unravel


@dataclasses.dataclass(frozen=True)
class Forward(Segmented):
    """Forward-mode hypergradient (all hyperparameter directions at once)."""

    def start(self, dyn, lam, length: int) -> Tangent:
        basis, _ = _basis(lam)
        z0 = jax.vmap(lambda e: jax.jvp(lambda l: _split(dyn.initial_state(l))[0], (lam,), (e,))[1])(basis)
        return Tangent(dyn.initial_state(lam), z0)

    def state(self, carry: Tangent):
        return carry.state

    def segment(self, dyn, objective, carry: Tangent, lam, start, length: int):
        floats, others, rebuild = _split(carry.state)
        basis, unravel = _basis(lam)

        def run(floats, lam):
            s, losses = dyn.rollout(rebuild(floats, others), lam, start, length)
            f2, o2, _ = _split(s)
            return f2, (o2, losses)

        def push(z, e):  # one column of Z: Z_{t+n} = A Z_t + B, through the whole segment
            return jax.jvp(run, (floats, lam), (z, e), has_aux=True)

        floats, z, (others, losses) = jax.vmap(push, out_axes=(None, 0, None))(carry.z, basis)

        def energy(floats, lam):
            return objective(rebuild(floats, others), lam)

        value, (g_state, g_lam) = jax.value_and_grad(energy, argnums=(0, 1))(floats, lam)
        # ∂E/∂s_t · Z_t: each state leaf's gradient contracted with its m tangents
        m = jax.tree.leaves(basis)[0].shape[0]
        dtype = jax.tree.leaves(basis)[0].dtype
        through_state = sum((jnp.tensordot(zl, gl, axes=gl.ndim) for zl, gl in zip(z, g_state)), jnp.zeros(m, dtype))
        grad = jax.tree.map(jnp.add, g_lam, unravel(through_state))
        return Tangent(rebuild(floats, others), z), value, grad, losses
