"""Square roots differentiated as 0 at 0, inside functions we do not own (optax's updates).

Adaptive optimizers divide by sqrt(v), and v = 0 exactly for a weight that has seen no
gradient yet. There the chain rule multiplies sqrt's infinite derivative by a zero tangent
(0 · ∞ = NaN) although nothing depends on λ. :func:`zero_safe_roots` traces a function to its
jaxpr and evaluates it again with every ``sqrt`` replaced by one whose derivative at 0 is 0;
values are unchanged, and so is every derivative away from 0.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal


@jax.custom_jvp
def _sqrt(x):
    return lax.sqrt(x)


@_sqrt.defjvp
def _sqrt_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = lax.sqrt(x)
    positive = x > 0
    return y, jnp.where(positive, t / (2 * jnp.where(positive, y, 1)), jnp.zeros_like(t))


def _evaluate(jaxpr: Jaxpr, consts, *args):
    env = {}

    def read(var):
        return var.val if isinstance(var, Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        inner = eqn.params.get("jaxpr")
        if eqn.primitive is lax.sqrt_p:
            out = [_sqrt(*values)]
        elif eqn.primitive.name in ("jit", "pjit") and isinstance(inner, ClosedJaxpr):
            out = _evaluate(inner.jaxpr, inner.consts, *values)
        else:
            with eqn.ctx.manager:
                out = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
            out = out if eqn.primitive.multiple_results else [out]
        env.update(zip(eqn.outvars, out))
    return [read(v) for v in jaxpr.outvars]


def zero_safe_roots(fn: Callable) -> Callable:
    """``fn`` with each square root's derivative at 0 taken as 0 (elsewhere unchanged).

    Square roots inside jitted sub-functions are replaced too; those inside control flow
    (``cond``, ``scan``, ``while``) and custom derivatives are left as they are.
    """

    def wrapped(*args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        flat = _evaluate(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(shape), flat)

    return wrapped
