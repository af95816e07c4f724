"""Objectives whose gradient does not set the memory floor: a validation loss over many examples,
evaluated a chunk at a time.

    objective = hg.chunked(lambda w, λ, batch: mean_loss(w, batch), (x_val, y_val), chunk_size=128)
    hg.hypergrad(dyn, objective, λ)

The gradient of a plain mean over n validation examples holds the activations of all n at once;
on a small CNN with 1,024 validation images that was half of Reverse's memory. Here the chunks
run in a ``lax.map`` whose body is a ``jax.checkpoint``: the backward pass recomputes one chunk's
forward pass at a time, so the objective's gradient holds one chunk's activations (for one more
forward pass over the validation set). ``hg.plan`` shows the objective's share of memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._checks import check_int


@jax.tree_util.register_pytree_node_class
class Chunked:
    """The objective ``(w, λ) -> (1/n) Σ_chunks |chunk| · loss(w, λ, chunk)`` (see :func:`chunked`).

    A pytree: the data are its leaves (arguments of a compiled program, never constants), the loss
    and the chunk size are static.
    """

    def __init__(self, loss: Callable, data: Any, chunk_size: int):
        self.loss = loss
        self.data = data
        self.chunk_size = chunk_size

    def tree_flatten(self):
        return (self.data,), (self.loss, self.chunk_size)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], children[0], aux[1])

    def __call__(self, w, lam):
        n = jax.tree.leaves(self.data)[0].shape[0]
        c = min(self.chunk_size, n)
        full, rest = divmod(n, c)
        loss = functools.partial(jax.checkpoint(self.loss, prevent_cse=False), w, lam)
        chunks = jax.tree.map(lambda x: x[: full * c].reshape((full, c) + x.shape[1:]), self.data)
        total = jnp.sum(jax.lax.map(loss, chunks)) * c
        if rest:
            total = total + loss(jax.tree.map(lambda x: x[full * c :], self.data)) * rest
        return total / n


def chunked(loss: Callable, data: Any, chunk_size: int) -> Chunked:
    """An objective that averages ``loss`` over ``data`` a chunk of examples at a time.

    Equal to ``loss(w, λ, data)`` when ``loss`` is a mean over the examples of its batch (the
    chunks are weighted by their sizes; the last may be shorter), with the memory of one chunk in
    its gradient.

    Args:
      loss: ``(w, λ, batch) -> scalar``, the mean loss over ``batch`` (a pytree of arrays like
        ``data``, with at most ``chunk_size`` examples along the leading axis).
      data: the validation examples, a pytree of arrays with a common leading axis of n examples.
      chunk_size: examples per chunk (the memory of the gradient grows with it; the number of
        sequential steps falls with it).

    Returns:
      A :class:`Chunked`, an objective ``(w, λ) -> scalar`` for :func:`hypergradient.hypergrad`,
      :func:`hypergradient.plan` and the drivers.
    """
    chunk_size = check_int("chunk_size", chunk_size)
    leaves = jax.tree.leaves(data)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
        raise ValueError("chunked: data must be a pytree of arrays with a leading axis of examples")
    sizes = {jnp.shape(x)[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(f"chunked: every array of data needs the same number of examples, got {sorted(sizes)}")
    return Chunked(loss, data, chunk_size)
