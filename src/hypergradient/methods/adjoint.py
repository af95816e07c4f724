"""Reverse-HG with the adjoint in a wider dtype than the run: ``hg.Reverse(adjoint_dtype=jnp.float32)``.

A bfloat16 run (bfloat16 weights, or float32 weights whose loss computes in bfloat16) is
differentiated by plain autodiff in bfloat16 too: the cotangents of a bfloat16 state are
bfloat16, and every Hessian-vector product of the backward pass runs in the loss's compute
dtype. Here the recursion is written out, so that α_t can live in another dtype:

    forward (the run itself, in its own dtypes):  s_t = Φ_t(s_{t-1}, λ),  storing s_0..s_{T-1}
    α_T = ∂E/∂s_T,  g = ∂E/∂λ                                         at ŝ_T
    for t = T..1:   g += α_t ∂Φ̂_t/∂λ,   α_{t-1} = α_t ∂Φ̂_t/∂s_{t-1}    at ŝ_{t-1}
    g += α_0 ∂ŝ_0/∂λ

where ŝ is s cast up to ``adjoint_dtype`` and Φ̂_t is the same step traced in it: the loss's
:func:`hypergradient.precision.to_compute` casts to ``adjoint_dtype`` instead of bfloat16 while
the step is traced for the backward pass. g is the exact derivative of the bfloat16 run, up to
treating its roundings (to the state dtype after each step, to the compute dtype inside the
loss) as the identity. Each backward step recomputes its forward step in ``adjoint_dtype``: about
the time of ``checkpoint_every=1``, with the states stored in the run's dtype (half of float32's
memory for a bfloat16 state). With ``checkpoint_every=k`` only every k-th state is stored and
each segment is recomputed, in the run's dtype, before it is walked back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._pytree import is_inexact, tree_norm
from ..errors import Failure
from ..precision import adjoint_precision
from . import reverse  # which imports this module: its names are read at call time
from .base import solution


def check_dtype(dtype, checkpoint_every):
    """``dtype`` as a NumPy floating dtype; ``ValueError`` for another dtype or nested checkpointing."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError("adjoint_dtype must be a floating-point dtype (jnp.float32) or None")
    if isinstance(checkpoint_every, tuple):
        raise ValueError("adjoint_dtype takes checkpoint_every=None or one int, not nested levels")
    return dtype


def _up(tree, dtype):
    """Floating-point leaves narrower than ``dtype`` cast up to it; the rest as they are."""
    def cast(a):
        if is_inexact(a) and jnp.finfo(jnp.result_type(a)).bits < jnp.finfo(dtype).bits:
            return a.astype(dtype)
        return a
    return jax.tree.map(cast, tree)


def _is_half(a) -> bool:
    return is_inexact(a) and jnp.finfo(jnp.result_type(a)).bits == 16


def _pack(tree):
    """16-bit floating leaves as their bits (uint16): stacked over the steps so, XLA:CPU keeps
    them at 2 bytes; a stacked bfloat16 state was held at float32's 4."""
    return jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16) if _is_half(a) else a, tree)


def _unpack(tree, ref):
    return jax.tree.map(lambda a, r: jax.lax.bitcast_convert_type(a, r.dtype) if _is_half(r) else a, tree, ref)


def _like(tree, ref):
    return jax.tree.map(lambda a, r: a.astype(jnp.result_type(r)), tree, ref)


class _Floats:
    """A state split into its floating-point leaves (differentiated) and the rest (a step count,
    a key: carried as they are)."""

    def __init__(self, example):
        leaves, self.treedef = jax.tree.flatten(example)
        self.mask = [is_inexact(x) for x in leaves]
        self.n_params = len(jax.tree.leaves(example.params))

    def floats(self, s):
        return [x for x, m in zip(jax.tree.leaves(s), self.mask) if m]

    def weights_norm(self, floats):
        """‖α‖ over the weights' part (the first leaves of a state are its weights')."""
        return tree_norm(floats[: sum(self.mask[: self.n_params])])

    def rebuild(self, floats, s):
        it = iter(floats)
        return jax.tree.unflatten(self.treedef, [next(it) if m else x for x, m in zip(jax.tree.leaves(s), self.mask)])


def value_and_grad(dyn, objective, lam, dtype, every: int | None, step_fn=None):
    """The :class:`~hypergradient.Reverse` solution with α_t in ``dtype`` (see the module); each
    backward step differentiates ``step_fn(s, λ, t)`` (default ``dyn.step``)."""
    step_fn = dyn.step if step_fn is None else step_fn
    dtype = jnp.dtype(dtype)
    T = dyn.steps
    s0 = dyn.initial_state(lam)
    split = _Floats(s0)
    lam_a = _up(lam, dtype)

    def vjp_step(s, t, alpha):
        """α ∂Φ̂_t/∂s and α ∂Φ̂_t/∂λ at ŝ = s cast up: the step traced in ``dtype``."""
        def step(floats, lam):
            new, _ = step_fn(split.rebuild(floats, s), lam, t)
            return split.floats(new)

        with adjoint_precision(dtype):  # the vjp too: a custom rule traces its products there
            _, vjp = jax.vjp(step, _up(split.floats(s), dtype), lam_a)
            return vjp(alpha)

    def walk_back(carry, states, ts):
        """The backward recursion over the steps ``ts`` whose input states are ``states``."""
        def body(carry, x):
            alpha, g = carry
            s, t = _unpack(x[0], s0), x[1]
            a_prev, g_t = vjp_step(s, t, alpha)
            return (a_prev, jax.tree.map(jnp.add, g, g_t)), split.weights_norm(alpha)

        return jax.lax.scan(body, carry, (states, ts), reverse=True)

    def forward(s, t):
        new, loss = dyn.step(s, lam, t)
        return new, (_pack(s), loss)

    k = every if every is not None and every < T else None

    def segment_starts(s, i):
        new, (_, losses) = jax.lax.scan(forward, s, i * k + jnp.arange(k))
        return new, (_pack(s), losses)

    if k is None:
        s_T, (states, losses) = jax.lax.scan(forward, s0, jnp.arange(T))
    else:
        n_seg, rest = divmod(T, k)
        s_mid, (starts, losses) = jax.lax.scan(segment_starts, s0, jnp.arange(n_seg))
        losses = losses.reshape(-1)
        s_T, (tail_states, tail_losses) = jax.lax.scan(forward, s_mid, n_seg * k + jnp.arange(rest))
        losses = jnp.concatenate([losses, tail_losses])

    value = objective(s_T, lam)
    with adjoint_precision(dtype):
        out, vjp_E = jax.vjp(lambda f, lam: objective(split.rebuild(f, s_T), lam), _up(split.floats(s_T), dtype), lam_a)
    carry = vjp_E(jnp.ones_like(out))

    if k is None:
        carry, norms = walk_back(carry, states, jnp.arange(T))
    else:
        carry, tail_norms = walk_back(carry, tail_states, n_seg * k + jnp.arange(rest))

        def segment_back(carry, x):
            s, i = _unpack(x[0], s0), x[1]
            ts = i * k + jnp.arange(k)
            _, (states, _) = jax.lax.scan(forward, s, ts)  # the run's own dtypes: the same states again
            return walk_back(carry, states, ts)

        carry, norms = jax.lax.scan(segment_back, carry, (starts, jnp.arange(n_seg)), reverse=True)
        norms = jnp.concatenate([norms.reshape(-1), tail_norms])

    alpha0, g = carry
    with adjoint_precision(dtype):
        _, vjp0 = jax.vjp(lambda lam: split.floats(_up(dyn.initial_state(lam), dtype)), lam_a)
    g = jax.tree.map(jnp.add, g, vjp0(alpha0)[0])

    growth = reverse.backward_growth(jnp.concatenate([split.weights_norm(alpha0)[None], norms]))  # last: ‖α_T‖
    result = jnp.where(growth > reverse.CHAOS_GROWTH, Failure.CHAOTIC, Failure.OK)
    return solution(value, _like(g, lam), s_T, losses, {"backward_growth": growth}, result)
