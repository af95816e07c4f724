"""The leaves of a weight pytree laid end to end in one flat vector, for ``Reversible``.

Its integer state, information buffer and per-weight hyperparameters are each one vector over all
leaves, so the fixed-point and coder code appears once in the program, not once per leaf (fewer,
larger operations; a fraction of the compile time).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..optim import broadcast_to


class Layout(NamedTuple):
    """Leaf i of the weights occupies entries ``[offsets[i], offsets[i] + sizes[i])`` of a vector of
    ``total``; ``weights`` is the tree itself, which hyperparameters are broadcast against."""

    weights: Any
    treedef: Any
    shapes: tuple
    sizes: tuple
    offsets: tuple
    total: int

    @classmethod
    def of(cls, weights) -> Layout:
        leaves, treedef = jax.tree.flatten(weights)
        shapes = tuple(jnp.shape(x) for x in leaves)
        sizes = tuple(math.prod(sh) for sh in shapes)
        offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        return cls(weights, treedef, shapes, sizes, offsets, sum(sizes))

    def flat(self, tree):
        """The leaves of ``tree`` (shaped like the weights) in one vector of their common dtype."""
        # in-place slice updates, not a concatenate: XLA:CPU fuses a concatenate with its
        # producers into one loop that picks the operand per element (10x a copy here)
        leaves = self.treedef.flatten_up_to(tree)
        out = jnp.zeros(self.total, jnp.result_type(*leaves))
        for x, o in zip(leaves, self.offsets):
            out = jax.lax.dynamic_update_slice(out, jnp.reshape(x, -1).astype(out.dtype), (o,))
        return out

    def unflatten(self, x):
        """The inverse of :meth:`flat`."""
        parts = [x[o : o + n].reshape(sh) for o, n, sh in zip(self.offsets, self.sizes, self.shapes)]
        return jax.tree.unflatten(self.treedef, parts)

    def per_weight(self, value, name: str, dtype, derive=lambda x: (x, 0)):
        """``derive(value) = (arrays, count)`` per layer (once for a scalar): the arrays laid out
        over the flat weights, the counts summed. ``value`` is an optimizer hyperparameter
        ``name`` (a scalar, one value per layer, or one per weight).

        Deriving before broadcasting keeps the integer divisions of a per-layer momentum's
        coder alphabet at one per layer instead of one per weight.
        """
        if jax.tree_util.treedef_is_leaf(jax.tree.structure(value)) and jnp.ndim(value) == 0:
            broadcast_to(value, self.weights, name)  # validates like the optimizer does
            return derive(jnp.asarray(value, dtype))
        parts = [derive(jnp.asarray(v, dtype)) for v in jax.tree.leaves(broadcast_to(value, self.weights, name))]
        # a concatenate here, unlike flat(): fused into its consumers, the broadcasts are never
        # materialised (slice updates as in flat() made B1 26% slower)
        lay_out = lambda *xs: jnp.concatenate(  # noqa: E731
            [jnp.broadcast_to(x, sh).reshape(-1) for x, sh in zip(xs, self.shapes)]
        )
        return jax.tree.map(lay_out, *[arrays for arrays, _ in parts]), sum(count for _, count in parts)
