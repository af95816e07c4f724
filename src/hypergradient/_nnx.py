"""Flax NNX modules as a run's initial weights.

An ``nnx.Module`` is split once: its ``nnx.Param`` variables are the weights that are trained,
every other variable (BatchNorm's ``BatchStat``, the key and count of each ``nnx.Rngs`` stream
behind Dropout) is model state, carried through the run as part of s_t. ``loss`` and the
objective receive the module merged again from both, so it runs as it is; what a call of
``loss`` changes in it (running statistics, RNG counts) is split off as the next model state.
Flax is never imported here unless the caller has imported it already.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax


def nnx():
    """``flax.nnx`` when the caller has imported it, else ``None``."""
    return sys.modules.get("flax.nnx")


def is_module(x: Any) -> bool:
    """Whether ``x`` is a Flax NNX module."""
    lib = nnx()
    return lib is not None and isinstance(x, lib.Module)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["arrays"], meta_fields=["graphdef"])
@dataclasses.dataclass(frozen=True, eq=False)
class Module:
    """``init`` given as an NNX module: its parameters (``arrays``, an ``nnx.State`` of the
    ``nnx.Param`` variables) and its graph (static)."""

    arrays: Any
    graphdef: Any
    skeleton = None

    @classmethod
    def split(cls, module) -> tuple[Module, Any]:
        """The module's initializer and its initial model state (every variable but the parameters)."""
        graphdef, params, rest = nnx().split(module, nnx().Param, ...)
        return cls(params, graphdef), rest

    def __call__(self, lam) -> Any:
        return self.arrays

    def combine(self, params, model_state) -> Any:
        """The module with the weights ``params`` and the model state ``model_state``, its variables
        made anew here: NNX lets a variable change only in the trace that made it."""
        fresh = jax.tree.map(lambda x: x, (params, model_state))
        return nnx().merge(self.graphdef, *fresh)

    def state_of(self, module) -> Any:
        """The model state held in ``module`` (after a call of ``loss`` has changed it)."""
        return nnx().split(module, nnx().Param, ...)[2]
