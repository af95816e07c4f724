"""Pytree plumbing shared by the core: splitting a callable pytree into its arrays and the rest.

A model such as an Equinox module is a pytree whose leaves are arrays (the weights) and other
things (activation functions, flags). Only the arrays may be arguments of a compiled program or
be trained; the rest is static. ``partition`` splits a tree that way, ``Skeleton.combine`` puts it
back together (the model of ``eqx.partition`` / ``eqx.combine``, without the dependency).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def is_inexact(x: Any) -> bool:
    """Whether ``x`` holds floating-point (or complex) values: a leaf that can carry a derivative."""
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


class Skeleton(NamedTuple):
    """The non-array part of a pytree: its structure and its non-array leaves (``None`` where an
    array was). Hashable when those leaves are, so it can key a compiled program."""

    treedef: Any
    rest: tuple

    def combine(self, arrays: Any) -> Any:
        """The whole tree again, from the arrays ``partition`` returned (or any tree shaped like them)."""
        leaves = self.treedef.flatten_up_to(arrays)
        return jax.tree.unflatten(self.treedef, [r if a is None else a for a, r in zip(leaves, self.rest)])


def partition(tree: Any) -> tuple[Any, Skeleton]:
    """``(arrays, skeleton)``: the tree with ``None`` in place of every non-array leaf, and the rest."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [x if is_array(x) else None for x in leaves]
    rest = tuple(None if is_array(x) else x for x in leaves)
    return jax.tree.unflatten(treedef, arrays), Skeleton(treedef, rest)


def has_only_arrays(tree: Any) -> bool:
    return all(is_array(x) for x in jax.tree.leaves(tree))


def signature(tree: Any) -> tuple:
    """What a compiled program depends on in a pytree: its structure (static fields included) and avals."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(jax.typeof(x) for x in leaves)


def nbytes(tree: Any) -> int:
    return int(sum(x.dtype.itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def tree_norm(tree: Any) -> jax.Array:
    """The L2 norm of all the leaves of ``tree`` together, ‖tree‖ = sqrt(Σ x²)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
