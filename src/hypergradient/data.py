"""Step-indexed, deterministic minibatches.

A training run asks for the batch of step ``t`` inside ``jit`` (and again on
the backward pass), so batches are a pure function of ``t``: no iterator
state, no host round trip.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
class Batches:
    """Minibatches of ``arrays`` indexed by training step.

    Step ``t`` belongs to epoch ``e = t // n_batches`` and takes batch
    ``i = t mod n_batches`` of that epoch, where ``n_batches = n // batch_size``
    (a trailing partial batch is never used). Without a ``key`` the order is
    the data's own: batch ``i`` is ``arrays[i*batch_size : (i+1)*batch_size]``.
    With a ``key`` every epoch is a fresh permutation drawn from
    ``fold_in(key, e)``, reproducible for any ``t``.

    Args:
      arrays: a pytree of arrays sharing their leading dimension ``n``
        (for example ``(x, y)``).
      batch_size: examples per step, ``1 <= batch_size <= n``.
      key: optional ``jax.random`` key for per-epoch shuffling.
    """

    def __init__(self, arrays: Any, batch_size: int, key: jax.Array | None = None):
        leaves = jax.tree.leaves(arrays)
        if not leaves:
            raise ValueError("Batches needs at least one array")
        sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in leaves}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                "Batches: every array needs the same leading (example) dimension; got shapes "
                f"{[jnp.shape(a) for a in leaves]}"
            )
        (n,) = sizes
        if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
            raise ValueError(f"Batches: batch_size must be an int in [1, {n}] (n examples), got {batch_size!r}")
        self.arrays = jax.tree.map(jnp.asarray, arrays)
        self.batch_size = batch_size
        self.key = key

    @property
    def size(self) -> int:
        return jax.tree.leaves(self.arrays)[0].shape[0]

    @property
    def n_batches(self) -> int:
        return self.size // self.batch_size

    def __call__(self, t) -> Any:
        epoch, i = jnp.divmod(t, self.n_batches)
        start = i * self.batch_size
        if self.key is None:
            return jax.tree.map(
                lambda a: jax.lax.dynamic_slice_in_dim(a, start, self.batch_size, axis=0), self.arrays
            )
        perm = jax.random.permutation(jax.random.fold_in(self.key, epoch), self.size)
        idx = jax.lax.dynamic_slice_in_dim(perm, start, self.batch_size)
        return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), self.arrays)

    def tree_flatten(self):
        return (self.arrays, self.key), self.batch_size

    @classmethod
    def tree_unflatten(cls, batch_size, children):
        obj = object.__new__(cls)
        obj.arrays, obj.key = children
        obj.batch_size = batch_size
        return obj

    def __repr__(self) -> str:
        return f"Batches(n={self.size}, batch_size={self.batch_size}, shuffled={self.key is not None})"
