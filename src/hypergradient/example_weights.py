"""A training run whose examples carry weights, the weights being hyperparameters.

``weighted(dyn)`` is ``dyn`` with hyperparameters λ' = (λ, u), u one weight per training example.
Its loss is ``dyn``'s called with the keyword ``example_weights=u[ids]``, ids the examples of the
step's batch (``data.indices(t)``); everything else reads λ = λ'[0]. A plain run of ``dyn`` never
passes the keyword (so the loss gives it a default, ``example_weights=1.0``); ``weighted(dyn)`` at
u = 1 trains exactly as ``dyn`` does, at u ∈ {0, 1}^n on a subset of the examples, and the
hypergradient in u is the data attribution score of every example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from .data import Indexed
from .dynamics import Dynamics, Function


@dataclasses.dataclass(frozen=True)
class _OnFirst:
    """``fn`` of λ'[0]: what reads λ alone (``init``, ``optimizer_hparams``)."""

    fn: Callable

    def __call__(self, lam, *args, **kwargs):
        return self.fn(lam[0], *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _WeightedLoss:
    """``loss(w, λ, batch, example_weights=u[ids])`` on an indexed batch ``(batch, ids)``."""

    loss: Callable

    def __call__(self, w, lam, batch, **kwargs):
        examples, ids = batch
        return self.loss(w, lam[0], examples, example_weights=jnp.take(lam[1], ids, axis=0), **kwargs)


def example_count(dyn: Dynamics) -> int:
    """n, the number of training examples ``dyn``'s data draws its batches from (``TypeError`` for
    data that does not say which examples a batch holds)."""
    dyn.batches.indices(jnp.zeros((), jnp.int32))  # the source's own message when it cannot say
    return dyn.batches.size


def weighted(dyn: Dynamics) -> Dynamics:
    """``dyn`` over λ' = (λ, u): its loss gets ``example_weights=u[ids]`` for the batch's examples.

    Traceable in λ' like any run: ``jax.vmap`` over u trains a population of reweighted (or, with
    u ∈ {0, 1}^n, subset) runs in one program.

    Raises:
      TypeError: ``dyn``'s data does not say which examples a batch holds (a function of ``t``).
    """
    example_count(dyn)
    init = _OnFirst(dyn.initializer.fn) if isinstance(dyn.initializer, Function) else dyn.init
    return dyn.replace(init=init, loss=_WeightedLoss(dyn.loss), optimizer_hparams=_OnFirst(dyn.optimizer_hparams),
                       data=Indexed.listed(dyn.batches, dyn.steps))


def unit_weights(dyn: Dynamics, lam) -> jax.Array:
    """u = 1 for every training example, in λ's floating-point dtype."""
    floats = [x for x in jax.tree.leaves(lam) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    dtype = jnp.result_type(*floats) if floats else jnp.asarray(1.0).dtype
    return jnp.ones(example_count(dyn), dtype)
