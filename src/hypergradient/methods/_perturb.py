"""What the evolution-strategy methods share: the key they are given, the antithetic
perturbations of λ drawn from it, and the estimate from a population of perturbed runs.

A perturbation of segment ``j`` at hyperparameters λ is z ~ N(0, I) over λ's structure (N pairs:
a leading axis N), drawn from ``fold_in(fold_in(key, j), digest(λ))``: the same key and λ give
the same draws, and the draws are fresh whenever λ moves (every hyper-step of ``hg.optimize``)
and differ between the members of a population.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_int, is_int
from .._pytree import is_array


def as_key(key) -> jax.Array:
    """A typed ``jax.random`` key from a seed (int), a typed key or a raw ``uint32[2]`` key."""
    if is_int(key):
        return jax.random.key(int(key))
    if is_array(key) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
        return key
    if is_array(key) and key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(f"key must be an int seed or one jax.random key (jax.random.key(0)), got {key!r}")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Perturbed:
    """Base of ES, PES and NRES: ``sigma``, ``pairs`` and ``key`` (their defaults) checked; equality, hash and repr
    by their values (the key by its key data), so that methods with equal settings share compiled
    programs and checkpoints name them readably. A traced key (``vmap`` over keys) works inside
    :func:`hypergradient.value_and_grad`; hashing it, as :func:`hypergradient.hypergrad` does, needs a
    concrete one."""

    sigma: float = 0.1
    pairs: int = 8
    key: jax.Array = 0

    def __post_init__(self):
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float, np.floating)) or not self.sigma > 0:
            raise ValueError(f"{type(self).__name__}(sigma=...) must be a positive number, got {self.sigma!r}")
        object.__setattr__(self, "sigma", float(self.sigma))
        object.__setattr__(self, "pairs", check_int(f"{type(self).__name__}(pairs)", self.pairs))
        object.__setattr__(self, "key", as_key(self.key))

    def _values(self) -> tuple:
        data = np.asarray(jax.random.key_data(self.key)).ravel().tolist()
        return type(self), self.sigma, self.pairs, str(jax.random.key_impl(self.key)), tuple(data)

    def __eq__(self, other):
        return type(other) is type(self) and self._values() == other._values()

    def __hash__(self):
        return hash(self._values())

    def __repr__(self):
        data = np.asarray(jax.random.key_data(self.key)).ravel().tolist()
        return f"{type(self).__name__}(sigma={self.sigma!r}, pairs={self.pairs}, key={data})"


def digest(lam) -> jax.Array:
    """A uint32 that changes whenever any bit of λ does (not cryptographic: it only seeds draws)."""
    h = jnp.uint32(0)
    for i, x in enumerate(jax.tree.leaves(lam)):
        x = jnp.asarray(x)
        width = jnp.dtype(x.dtype).itemsize
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16 if width == 2 else jnp.uint32).astype(jnp.uint32).ravel()
        odd = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(2 * i + 1)
        h = h * jnp.uint32(0x9E3779B1) + jnp.sum(bits * odd, dtype=jnp.uint32)
    return h


def draw(key: jax.Array, lam, pairs: int, segment) -> object:
    """z ~ N(0, I): λ's structure, each leaf with a leading axis of ``pairs`` and its own dtype."""
    leaves, treedef = jax.tree.flatten(lam)
    key = jax.random.fold_in(jax.random.fold_in(key, segment), digest(lam))
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, (pairs,) + jnp.shape(x), jnp.result_type(x))
                              for k, x in zip(keys, leaves)])


def antithetic(lam, z, sigma: float):
    """The 2N perturbed hyperparameters, stacked: λ + σz_i for i < N, then λ − σz_i."""
    return jax.tree.map(lambda x, e: jnp.concatenate([x + sigma * e, x - sigma * e]).astype(jnp.result_type(x)),
                        lam, z)


def population_step(dyn, objective, particles, lam, z, xi, sigma: float, start, length: int):
    """Run the 2N particles (stacked states, one vmapped batch) for ``length`` steps under
    λ ± σz, and estimate the gradient from their objectives at the end:

        g = (1/N) Σ_i g_i,   g_i = ξ_i (f_i⁺ − f_i⁻) / (2σ)

    Returns ``(particles, g, stats)``: ``variance`` is the estimated variance of g summed over
    λ's components, Σ_k s_k²/N with s_k² the sample variance of the per-pair g_i,k (NaN for one
    pair); ``runs`` the perturbed runs; ``diverged_runs`` how many of them were not finite.
    """
    lams = antithetic(lam, z, sigma)
    particles, losses = jax.vmap(lambda s, l: dyn.rollout(s, l, start, length))(particles, lams)
    values = jax.vmap(objective)(particles, lams)
    n = values.shape[0] // 2
    diff = values[:n] - values[n:]
    per_pair = jax.tree.map(lambda x: x * (diff / (2 * sigma)).reshape((n,) + (1,) * (x.ndim - 1)).astype(x.dtype),
                            xi)
    grad = jax.tree.map(lambda g: jnp.mean(g, axis=0), per_pair)
    spread = sum(jnp.sum(jnp.var(g, axis=0, ddof=1)) for g in jax.tree.leaves(per_pair)) / n
    finite = jnp.isfinite(values) & jnp.all(jnp.isfinite(losses), axis=1)
    stats = {"variance": spread, "runs": jnp.asarray(2 * n, jnp.int32),
             "diverged_runs": jnp.sum(~finite).astype(jnp.int32)}
    return particles, grad, stats
