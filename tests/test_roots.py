"""The square roots that from_optax differentiates as 0 at 0."""

import jax
import jax.numpy as jnp
import numpy as np

from hypergradient._roots import zero_safe_roots


def test_zero_safe_roots_changes_only_the_derivative_at_zero():
    """sqrt's derivative at 0 becomes 0, in the function and in its jitted sub-functions;
    values, and derivatives away from 0, are those of the function itself."""

    def f(x, y):
        return jnp.sqrt(x) * y + jax.jit(lambda z: jnp.sqrt(z) ** 3)(x), jnp.linalg.norm(y)

    def g(x, y):
        a, b = f(x, y)
        return jnp.sum(a) + b

    x, y = jnp.asarray([0.0, 0.5, 2.0]), jnp.asarray([1.0, -2.0, 3.0])
    safe = zero_safe_roots(f)
    for ours, theirs in zip(jax.tree.leaves(safe(x, y)), jax.tree.leaves(f(x, y))):
        np.testing.assert_array_equal(ours, theirs)
    grad = jax.grad(lambda x, y: jnp.sum(safe(x, y)[0]) + safe(x, y)[1], argnums=(0, 1))(x, y)
    exact = jax.grad(g, argnums=(0, 1))(x, y)
    assert np.isnan(exact[0][0]) or np.isinf(exact[0][0])
    assert grad[0][0] == 0.0
    np.testing.assert_allclose(grad[0][1:], exact[0][1:], rtol=1e-6)
    np.testing.assert_allclose(grad[1], exact[1], rtol=1e-6)
    tangent = jax.jvp(lambda x: safe(x, y)[0], (x,), (jnp.ones(3),))[1]
    assert tangent[0] == 0.0 and np.isnan(jax.jvp(lambda x: f(x, y)[0], (x,), (jnp.ones(3),))[1][0])
    np.testing.assert_array_equal(jax.jit(jax.vmap(safe, in_axes=(0, None)))(x[:, None], y)[0], jax.vmap(f, in_axes=(0, None))(x[:, None], y)[0])
