"""The training run being tuned, as a dynamical system.

    s_t = Φ_t(s_{t-1}, λ),   s_0 = (init(λ), optimizer.init(init(λ))),   t = 0..T-1

where s = (weights, optimizer state), and Φ_t takes the gradient of the
training loss on the batch of step ``t`` and applies the inner optimizer with
the hyperparameters ``optimizer_hparams(λ, t)``. Steps are numbered from 0, so
a per-step schedule is indexed as ``lam["lr"][t]``.

``Dynamics`` is a pytree: its arrays (fixed initial weights, the data) are
leaves and its functions are static, so one compiled program serves every
call with the same functions and shapes, and ``jax.vmap`` can map over the
arrays it holds. The initial weights may be any callable pytree (an Equinox
module): its array leaves are the weights that are trained, the rest is
static, and ``loss`` and the objective receive the whole model again.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_int
from ._pytree import Skeleton, has_only_arrays, is_array, partition
from .data import Data, as_data
from .errors import DivergenceError
from .optim import Optimizer
from .precision import library_precision

Params = Any


class State(NamedTuple):
    """The state of the training run: weights and optimizer state."""

    params: Params
    opt_state: Any


def first_nonfinite(losses) -> int | None:
    """Index of the first non-finite entry of a per-step loss trace, or None."""
    bad = ~np.isfinite(np.asarray(losses))
    return int(np.argmax(bad)) if bad.any() else None


def is_function(x: Any) -> bool:
    """A callable that holds no arrays: ``init`` as a function of λ, not a
    callable pytree of weights (an Equinox module is both)."""
    return callable(x) and not any(is_array(leaf) for leaf in jax.tree.leaves(x))


def check_hparams_dtype(lam: Any) -> None:
    """Raise ``TypeError`` unless every leaf of λ is floating point."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(lam)
    if not leaves:
        raise ValueError("hyperparameters λ are empty: there is nothing to differentiate")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"hyperparameter {jax.tree_util.keystr(path) or 'λ'} has dtype {dtype}; "
                "hyperparameters must be floating point (write 0.5, not 1, or cast with jnp.asarray(x, float))"
            )


def check_finite(tree: Any, what: str) -> None:
    """Raise ``ValueError`` naming the first leaf of ``tree`` that holds NaN or inf (traced leaves
    are not checked)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not is_array(leaf) or isinstance(leaf, jax.core.Tracer) or not jnp.issubdtype(leaf.dtype, jnp.inexact):
            continue
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            # spread over several processes: this process checks one copy of each of its shards
            pieces = [(s.index, s.data) for s in leaf.addressable_shards if s.replica_id == 0]
        else:
            pieces = [((), leaf)]
        for index, piece in pieces:
            a = np.asarray(piece)
            if np.isfinite(a).all():
                continue
            bad = np.argwhere(~np.isfinite(a))[0]
            offsets = [sl.start or 0 for sl in index] + [0] * (a.ndim - len(index))
            at = tuple(int(i) + o for i, o in zip(bad, offsets))
            raise ValueError(
                f"{what} {jax.tree_util.keystr(path) or ''} holds {a[tuple(bad)]} (first at index {at}): "
                "NaN and inf cannot be trained on or tuned; clean the input first".replace("  ", " ")
            )


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["fn"])
@dataclasses.dataclass(frozen=True)
class Function:
    """``init`` given as a function ``λ -> w_0`` (held static: init scales are hyperparameters too)."""

    fn: Callable[[Any], Params]
    skeleton = None

    def __call__(self, lam) -> Params:
        return self.fn(lam)

    @property
    def given(self) -> Callable[[Any], Params]:
        return self.fn


@functools.partial(jax.tree_util.register_dataclass, data_fields=["arrays"], meta_fields=["skeleton"])
@dataclasses.dataclass(frozen=True, eq=False)
class Weights:
    """``init`` given as fixed weights: the arrays that are trained (leaves), and for a model the
    rest of it (``skeleton``, static; ``None`` for a pytree of arrays alone)."""

    arrays: Params
    skeleton: Skeleton | None

    def __call__(self, lam) -> Params:
        return self.arrays

    @property
    def given(self) -> Params:
        return self.arrays if self.skeleton is None else self.skeleton.combine(self.arrays)


def as_init(init: Any) -> Function | Weights:
    """``init`` as a :class:`Function` or :class:`Weights` (a model split into its arrays and the rest).
    Decided here, once: inside ``jit`` a model's leaves are tracers."""
    if is_function(init):
        return Function(init)
    return Weights(init, None) if has_only_arrays(init) else Weights(*partition(init))


@jax.tree_util.register_pytree_node_class
class Dynamics:
    """A training run whose final weights are differentiated in λ.

    Immutable: ``dyn.replace(steps=50)`` is a new run with one argument changed. ``init`` and
    ``data`` are normalized once, here, into ``initializer`` (a ``Function`` or ``Weights``,
    ``λ -> w_0``) and ``batches`` (a ``Batches``, ``Steps`` or ``Fixed``, ``t -> batch``); ``dyn.init`` and ``dyn.data`` give them back as they were given.

    Args:
      init: the initial weights, a pytree (a callable pytree such as an
        Equinox or Flax nnx module counts as weights: its array leaves are
        trained, the rest is static), or a function ``λ -> w_0`` (init scales
        are hyperparameters too).
      loss: ``(w, λ, batch) -> scalar`` training loss (``w`` is the whole
        model again when ``init`` is a module).
      optimizer: a differentiable inner optimizer from :mod:`hypergradient.optim`.
      optimizer_hparams: ``(λ, t) -> dict`` of the optimizer's hyperparameters
        at step ``t`` (for example ``{"lr": lam["lr"][t], "momentum": 0.9}``).
      data: ``t -> batch`` (a :class:`hypergradient.data.Batches` or any
        traceable function), a fixed batch (any non-callable pytree: full-batch
        training), or ``None`` (``loss`` receives ``None``).
      steps: the number of training steps ``T >= 1``.
    """

    initializer: Function | Weights
    batches: Data
    loss: Callable[[Params, Any, Any], jax.Array]
    optimizer: Optimizer
    optimizer_hparams: Callable[[Any, jax.Array], Mapping[str, Any]]
    steps: int

    def __init__(
        self,
        init: Params | Callable[[Any], Params],
        loss: Callable[[Params, Any, Any], jax.Array],
        optimizer: Optimizer,
        optimizer_hparams: Callable[[Any, jax.Array], Mapping[str, Any]],
        data: Any = None,
        steps: int = 100,
    ):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a hypergradient.optim optimizer (hg.optim.sgd(), momentum(), adam(), "
                f"from_optax(...)), got {type(optimizer).__name__}"
            )
        if not callable(loss):
            raise TypeError("loss must be a function (w, λ, batch) -> scalar")
        if not callable(optimizer_hparams):
            raise TypeError("optimizer_hparams must be a function (λ, t) -> dict of optimizer hyperparameters")
        self._set(as_init(init), as_data(data), loss, optimizer, optimizer_hparams, check_int("steps", steps))

    def _set(self, *values) -> None:
        for name, value in zip(_FIELDS, values):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"Dynamics is immutable: use dyn.replace({name}=...) for a run with another {name}")

    def replace(self, **changes) -> Dynamics:
        """This run with some of the constructor's arguments changed, checked as a new one is."""
        given = {"init": self.init, "loss": self.loss, "optimizer": self.optimizer,
                 "optimizer_hparams": self.optimizer_hparams, "data": self.data, "steps": self.steps}
        unknown = set(changes) - set(given)
        if unknown:
            raise TypeError(f"Dynamics.replace: no argument {', '.join(sorted(unknown))} (it takes {', '.join(given)})")
        return Dynamics(**{**given, **changes})

    @property
    def init(self) -> Params | Callable[[Any], Params]:
        """``init`` as given: the function ``λ -> w_0``, or the initial weights (the whole model)."""
        return self.initializer.given

    @property
    def data(self) -> Any:
        """``data`` as given: the ``Batches``, the function of ``t``, or the fixed batch."""
        return self.batches.given

    @property
    def skeleton(self) -> Skeleton | None:
        """The non-array part of a model given as ``init`` (``None`` otherwise)."""
        return self.initializer.skeleton

    # -- pytree: the sources hold the arrays, functions are static ------------
    def tree_flatten(self):
        return (self.initializer, self.batches), (self.loss, self.optimizer, self.optimizer_hparams, self.steps)

    @classmethod
    def tree_unflatten(cls, static, children):
        obj = object.__new__(cls)
        obj._set(*children, *static)
        return obj

    def __repr__(self) -> str:
        return f"Dynamics(optimizer={self.optimizer.name}, steps={self.steps}, data={self.data!r})"

    # -- the system ------------------------------------------------------------
    def initial_params(self, lam) -> Params:
        """w_0: ``init(λ)`` or the fixed initial weights (a model's array leaves)."""
        return self.initializer(lam)

    def model(self, params: Params) -> Params:
        """The weights as ``loss`` and the objective see them: the whole model when ``init`` was one."""
        return params if self.skeleton is None else self.skeleton.combine(params)

    def train_loss(self, params, lam, batch) -> jax.Array:
        """``loss`` at the weights ``params`` (the trained arrays) on ``batch``."""
        return self.loss(self.model(params), lam, batch)

    def initial_state(self, lam) -> State:
        """s_0 = (w_0, optimizer.init(w_0))."""
        w0 = self.initial_params(lam)
        return State(w0, self.optimizer.init(w0))

    def batch(self, t):
        """The minibatch of step ``t``."""
        return self.batches(t)

    def hparams(self, lam, t) -> Mapping[str, Any]:
        """The optimizer's hyperparameters at step ``t``."""
        return self.optimizer_hparams(lam, t)

    def loss_and_grad(self, params, lam, t):
        """Training loss of step ``t`` and its gradient in the weights."""
        return jax.value_and_grad(self.train_loss)(params, lam, self.batch(t))

    def step(self, state: State, lam, t) -> tuple[State, jax.Array]:
        """Φ_t: one training step; returns the new state and the step's training loss."""
        loss, g = self.loss_and_grad(state.params, lam, t)
        params, opt_state = self.optimizer.update(g, state.opt_state, state.params, self.hparams(lam, t))
        return State(params, opt_state), loss

    def rollout(self, state: State, lam, start, length: int) -> tuple[State, jax.Array]:
        """Apply Φ_t for t = start..start+length-1 as one ``lax.scan``.

        Returns the final state and the per-step training losses (shape ``(length,)``).
        """

        def body(s, t):
            return self.step(s, lam, t)

        return jax.lax.scan(body, state, start + jnp.arange(length))

    def run(self, lam) -> Params:
        """Plain training: the final weights w_T (the whole model when ``init`` was one), jit-compiled.

        Traceable: under ``jax.jit`` or ``jax.vmap`` it returns the traced weights and checks
        nothing (use :func:`train` for the per-step losses).

        Raises:
          DivergenceError: outside a transformation, if a training loss became NaN or inf.
        """
        check_hparams_dtype(lam)
        state, losses = train(self, lam)
        if not isinstance(losses, jax.core.Tracer):
            step = first_nonfinite(losses)
            if step is not None:
                raise DivergenceError(f"training diverged: the training loss is not finite at step {step}", step)
        return self.model(state.params)

    def check_finite(self) -> None:
        """Raise ``ValueError`` if the initial weights or the training data hold NaN or inf."""
        check_finite(self.init, "the initial weights")  # a function holds no arrays
        check_finite(getattr(self.batches, "examples", None), "the training data")

    def validate(self, lam) -> None:
        """Trace one step abstractly (at the programs' product precision); raise a ``ValueError``
        naming what cannot run."""
        with library_precision():
            check_hparams_dtype(lam)
            t0 = jnp.zeros((), jnp.int32)
            try:
                state = jax.eval_shape(self.initial_state, lam)
            except Exception as e:
                raise ValueError(f"init(λ) failed: {e}") from e
            hp = jax.eval_shape(self.hparams, lam, t0)
            self.optimizer.check_hparams(hp)
            self.batches.check()
            batch = jax.eval_shape(self.batch, t0)
            try:
                loss = jax.eval_shape(lambda p: self.train_loss(p, lam, self.batch(t0)), state.params)
            except Exception as e:
                raise ValueError(
                    f"the training loss fails on the batch of step 0 (batch shapes {_shapes(batch)}, "
                    f"weight shapes {_shapes(state.params)}): {e}"
                ) from e
            if getattr(loss, "shape", None) != ():
                raise ValueError(f"loss must return a scalar, it returned shape {getattr(loss, 'shape', loss)}")
            try:
                jax.eval_shape(self.step, state, lam, t0)
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(
                    f"the {self.optimizer.name} step fails with hyperparameters of shapes {_shapes(hp)} "
                    f"on weights of shapes {_shapes(state.params)}: {e}"
                ) from e


_FIELDS = ("initializer", "batches", "loss", "optimizer", "optimizer_hparams", "steps")


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


@jax.jit
def train(dyn: Dynamics, lam) -> tuple[State, jax.Array]:
    """The training run: the final state s_T and the training loss of every step (compiled once
    per dynamics functions and shapes; float32 products at :mod:`~hypergradient.precision`'s)."""
    with library_precision():
        return dyn.rollout(dyn.initial_state(lam), lam, 0, dyn.steps)
