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

from . import _nnx
from ._checks import check_int
from ._pytree import Skeleton, has_only_arrays, is_array, partition
from .data import Data, as_data
from .errors import DivergenceError, MethodError
from .optim import Optimizer
from .precision import library_precision

Params = Any


class State(NamedTuple):
    """The state of the training run: weights and optimizer state."""

    params: Params
    opt_state: Any


class StatefulState(NamedTuple):
    """The state of a run whose model has state of its own (BatchNorm's running statistics, an
    NNX module's RNG counts): weights, optimizer state and model state. Part of s_t like the
    rest: carried, recomputed and differentiated where it depends on λ."""

    params: Params
    opt_state: Any
    model_state: Any


def model_state(s) -> Any:
    """The model state held in the training state ``s`` (``None`` for a run without one)."""
    return getattr(s, "model_state", None)


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

    def combine(self, params, model_state) -> Params:
        return params

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

    def combine(self, params, model_state) -> Params:
        """The model as ``loss`` sees it: the whole model for a module, the arrays alone otherwise."""
        return params if self.skeleton is None else self.skeleton.combine(params)

    @property
    def given(self) -> Params:
        return self.combine(self.arrays, None)


def as_init(init: Any) -> Function | Weights:
    """``init`` as a :class:`Function` or :class:`Weights` (a model split into its arrays and the rest).
    Decided here, once: inside ``jit`` a model's leaves are tracers. (An NNX module is split by
    :class:`hypergradient._nnx.Module`, before.)"""
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
      state: the model's own initial state (an Equinox ``eqx.nn.State``, any pytree): ``loss`` is
        then called as ``loss(w, λ, batch, state=s)`` and returns ``(value, new_state)``, and the
        objective as ``objective(w, λ, state=s_T)``. The state is part of s_t: every method
        carries it, and it is differentiated where it depends on λ (BatchNorm's running
        statistics at w_T do). A Flax NNX module as ``init`` needs no ``state``: its variables
        other than ``nnx.Param`` are its state, kept inside the module that ``loss`` receives.
      key: a ``jax.random`` key: ``loss`` is then also called with ``key=fold_in(key, t)`` at step
        ``t``, for dropout and augmentation. Every method (recomputation, Forward, the online
        drivers, populations) replays the same keys; with data sharded over devices the loss sees
        the global batch and one key, and ``jax_threefry_partitionable`` (JAX's default) draws
        the same bits whatever the number of devices.

    ``state`` and ``key`` are passed to ``loss`` only when given, so a loss without them is
    called as ``loss(w, λ, batch)``.
    """

    initializer: Function | Weights
    batches: Data
    initial_model_state: Any
    key: jax.Array | None
    loss: Callable[..., Any]
    optimizer: Optimizer
    optimizer_hparams: Callable[[Any, jax.Array], Mapping[str, Any]]
    steps: int
    stateful: bool

    def __init__(
        self,
        init: Params | Callable[[Any], Params],
        loss: Callable[..., Any],
        optimizer: Optimizer,
        optimizer_hparams: Callable[[Any, jax.Array], Mapping[str, Any]],
        data: Any = None,
        steps: int = 100,
        *,
        state: Any = None,
        key: jax.Array | None = None,
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
        if key is not None and not (is_array(key) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                                      or (key.dtype == jnp.uint32 and key.shape == (2,)))):
            raise TypeError(f"key must be a jax.random key (jax.random.key(0)), got {key!r}")
        if _nnx.is_module(init):
            if state is not None:
                raise TypeError("an NNX module carries its state itself (BatchStat, Rngs): give init=module without state=")
            initializer, model_state = _nnx.Module.split(init)
        else:
            initializer, model_state = as_init(init), state
        self._set(initializer, as_data(data), model_state, key, loss, optimizer, optimizer_hparams,
                  check_int("steps", steps), state is not None)

    def _set(self, *values) -> None:
        for name, value in zip(_FIELDS, values):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"Dynamics is immutable: use dyn.replace({name}=...) for a run with another {name}")

    def replace(self, **changes) -> Dynamics:
        """This run with some of the constructor's arguments changed, checked as a new one is."""
        given = {"init": self.init, "loss": self.loss, "optimizer": self.optimizer,
                 "optimizer_hparams": self.optimizer_hparams, "data": self.data, "steps": self.steps,
                 "state": self.initial_model_state if self.stateful else None, "key": self.key}
        unknown = set(changes) - set(given)
        if unknown:
            raise TypeError(f"Dynamics.replace: no argument {', '.join(sorted(unknown))} (it takes {', '.join(given)})")
        return Dynamics(**{**given, **changes})

    @property
    def init(self) -> Params | Callable[[Any], Params]:
        """``init`` as given: the function ``λ -> w_0``, or the initial weights (the whole model)."""
        if isinstance(self.initializer, _nnx.Module):
            return self.model(self.initializer.arrays, self.initial_model_state)
        return self.initializer.given

    @property
    def carries_state(self) -> bool:
        """Whether s_t holds a model state (``state=`` given, or an NNX module as ``init``)."""
        return self.stateful or isinstance(self.initializer, _nnx.Module)

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
        children = (self.initializer, self.batches, self.initial_model_state, self.key)
        return children, (self.loss, self.optimizer, self.optimizer_hparams, self.steps, self.stateful)

    @classmethod
    def tree_unflatten(cls, static, children):
        obj = object.__new__(cls)
        obj._set(*children, *static)
        return obj

    def __repr__(self) -> str:
        extra = (", state=..." if self.carries_state else "") + (", key=..." if self.key is not None else "")
        return f"Dynamics(optimizer={self.optimizer.name}, steps={self.steps}, data={self.data!r}{extra})"

    # -- the system ------------------------------------------------------------
    def initial_params(self, lam) -> Params:
        """w_0: ``init(λ)`` or the fixed initial weights (a model's array leaves)."""
        return self.initializer(lam)

    def model(self, params: Params, model_state: Any = None) -> Params:
        """The weights as ``loss`` and the objective see them: the whole model when ``init`` was one
        (an NNX module holding ``model_state``, the initial one when ``None``)."""
        if isinstance(self.initializer, _nnx.Module):
            return self.initializer.combine(params, self.initial_model_state if model_state is None else model_state)
        return self.initializer.combine(params, model_state)

    def train_loss(self, params, lam, batch, model_state=None, key=None) -> tuple[jax.Array, Any]:
        """``loss`` at the weights ``params`` (the trained arrays) on ``batch``, and the model state
        after it: ``(value, new model state)`` (``None`` for a run without one)."""
        extra = {} if key is None else {"key": key}
        model = self.model(params, model_state)
        if not self.stateful:
            value = self.loss(model, lam, batch, **extra)
            return value, self.initializer.state_of(model) if isinstance(self.initializer, _nnx.Module) else None
        out = self.loss(model, lam, batch, state=model_state, **extra)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("with Dynamics(state=...), loss must return (value, new_state), "
                            f"it returned {type(out).__name__}")
        return out

    def step_key(self, t) -> jax.Array | None:
        """The key of step ``t``, ``fold_in(key, t)`` (``None`` without ``key=``)."""
        return None if self.key is None else jax.random.fold_in(self.key, t)

    def initial_state(self, lam) -> State | StatefulState:
        """s_0 = (w_0, optimizer.init(w_0)), and the initial model state when there is one."""
        w0 = self.initial_params(lam)
        return self.state_of(w0, self.optimizer.init(w0), self.initial_model_state)

    def state_of(self, params, opt_state, model_state) -> State | StatefulState:
        """The training state holding these parts (``model_state`` is dropped for a run without one)."""
        if self.carries_state:
            return StatefulState(params, opt_state, model_state)
        return State(params, opt_state)

    def objective_at(self, objective, final, lam, *args) -> jax.Array:
        """``objective(model, λ, *args)`` at the end of a run (with ``state=`` the model state's
        keyword too); ``final`` is s_T, or for a run without model state the trained arrays w_T.

        This is how a :class:`~hypergradient.Method` calls a user's objective: with the whole
        state it serves every run; with the weights alone, only runs without model state.
        """
        if isinstance(final, (State, StatefulState)):
            params, held = final.params, model_state(final)
        elif self.carries_state:
            raise MethodError("this method gives the objective the weights alone, but the run carries a model "
                              "state (state= or an NNX module): give it the whole state s_T")
        else:
            params, held = final, None
        extra = {"state": held} if self.stateful else {}
        return objective(self.model(params, held), lam, *args, **extra)

    def batch(self, t):
        """The minibatch of step ``t``."""
        return self.batches(t)

    def hparams(self, lam, t) -> Mapping[str, Any]:
        """The optimizer's hyperparameters at step ``t``."""
        return self.optimizer_hparams(lam, t)

    def loss_and_grad(self, params, lam, t, model_state=None):
        """Training loss of step ``t``, its gradient in the weights, and the model state after it."""
        (value, new), g = jax.value_and_grad(self.train_loss, has_aux=True)(
            params, lam, self.batch(t), model_state, self.step_key(t))
        return value, g, new

    def step(self, state: State, lam, t, loss_and_grad=None) -> tuple[State, jax.Array]:
        """Φ_t: one training step; returns the new state and the step's training loss.

        ``loss_and_grad``: how the step takes its gradient, a function with the signature of
        :meth:`loss_and_grad` (default: that method), for a method that differentiates the
        gradient its own way."""
        loss_and_grad = self.loss_and_grad if loss_and_grad is None else loss_and_grad
        loss, g, held = loss_and_grad(state.params, lam, t, model_state(state))
        params, opt_state = self.optimizer.update(g, state.opt_state, state.params, self.hparams(lam, t))
        return self.state_of(params, opt_state, held), loss

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
        return self.model(state.params, model_state(state))

    def check_finite(self) -> None:
        """Raise ``ValueError`` if the initial weights or the training data hold NaN or inf."""
        check_finite(self.init, "the initial weights")  # a function holds no arrays
        check_finite(getattr(self.batches, "examples", None), "the training data")
        check_finite(self.initial_model_state, "the initial model state")

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
                loss, held = jax.eval_shape(
                    lambda s: self.train_loss(s.params, lam, self.batch(t0), model_state(s), self.step_key(t0)), state)
            except TypeError as e:
                if "loss must return (value, new_state)" in str(e):
                    raise
                raise ValueError(f"the training loss fails on the batch of step 0 (batch shapes {_shapes(batch)}, "
                                 f"weight shapes {_shapes(state.params)}): {e}") from e
            except Exception as e:
                raise ValueError(
                    f"the training loss fails on the batch of step 0 (batch shapes {_shapes(batch)}, "
                    f"weight shapes {_shapes(state.params)}): {e}"
                ) from e
            if getattr(loss, "shape", None) != ():
                raise ValueError(f"loss must return a scalar, it returned shape {getattr(loss, 'shape', loss)}")
            if self.carries_state and _signature(held) != _signature(model_state(state)):
                raise ValueError(
                    "the model state loss returns differs from the one it was given (structure, shapes or dtypes): "
                    f"given {_shapes(model_state(state))}, returned {_shapes(held)}; the state is carried from step to "
                    "step and must keep its form"
                )
            try:
                jax.eval_shape(self.step, state, lam, t0)
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(
                    f"the {self.optimizer.name} step fails with hyperparameters of shapes {_shapes(hp)} "
                    f"on weights of shapes {_shapes(state.params)}: {e}"
                ) from e


_FIELDS = ("initializer", "batches", "initial_model_state", "key", "loss", "optimizer", "optimizer_hparams",
           "steps", "stateful")


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def _signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(tuple(a.shape), a.dtype) for a in leaves]


@jax.jit
def train(dyn: Dynamics, lam) -> tuple[State, jax.Array]:
    """The training run: the final state s_T and the training loss of every step (compiled once
    per dynamics functions and shapes; float32 products at :mod:`~hypergradient.precision`'s)."""
    with library_precision():
        return dyn.rollout(dyn.initial_state(lam), lam, 0, dyn.steps)
