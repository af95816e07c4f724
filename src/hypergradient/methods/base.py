"""What every hypergradient method is: a small frozen object that knows *how to differentiate* a
training run (the model of optimistix's adjoints), and the :class:`Solution` it returns.

A method implements one abstract method, ``value_and_grad(dyn, objective, λ) -> Solution``: pure
and traceable, so ``jit``, ``vmap`` and sharding compose with it. Failures travel in the
solution as :class:`~hypergradient.errors.Failure` codes; raising is the host's business
(:func:`hypergradient.hypergrad`).

Methods that can stop after any segment of the run and go on later (Forward, Truncated) are
:class:`Segmented`: the real-time drivers RTHO and TRHO run the same ``segment`` code every Δ
steps that a whole-run hypergradient runs once with Δ = T.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..dynamics import Dynamics, State, StatefulState, model_state
from ..errors import Failure

Objective = Callable[[Any, Any], jax.Array]


class Solution(NamedTuple):
    """What a hypergradient computation returns; a pytree of arrays (``vmap`` adds a leading axis).

    Attributes:
      value: f(λ), the objective at the final weights.
      grad: ∇f(λ), with λ's structure.
      params: the trained arrays of w_T (``dyn.model(params)`` is the whole model when ``init``
        was one; then its non-array leaves are ``None`` here, so a Solution is always a valid
        output of ``jit``).
      losses: the training loss of every step, shape ``(T,)``.
      diverged: ``True`` when the training loss, the objective or the hypergradient is not finite.
      result: a :class:`~hypergradient.errors.Failure` code (int32; 0 when all went well).
      stats: the method's own figures, a dict of arrays (``Reversible``: bits per weight per step,
        buffer bytes, ...).
      state: the model state at the end (``Dynamics(state=...)``, an NNX module's variables other
        than its parameters); ``None`` for a run without one.
    """

    value: jax.Array
    grad: Any
    params: Any
    losses: jax.Array
    diverged: jax.Array
    result: jax.Array
    stats: dict
    state: Any = None


class Trained(NamedTuple):
    """What a run leaves for its :class:`Solution`: the trained weights w_T and the model state
    (``None`` for a run without one), without the optimizer state."""

    params: Any
    model_state: Any


def solution(value, grad, final, losses, stats: dict | None = None, result=Failure.OK) -> Solution:
    """A method's :class:`Solution` before the divergence checks (``diverged`` is filled in by
    :func:`hypergradient.value_and_grad`); ``final`` is s_T, a :class:`Trained`, or the trained
    arrays w_T alone."""
    whole = isinstance(final, (State, StatefulState, Trained))
    params, held = (final.params, model_state(final)) if whole else (final, None)
    return Solution(value, grad, params, losses, jnp.asarray(False), jnp.asarray(result, jnp.int32), stats or {}, held)


class Method(abc.ABC):
    """Base of the hypergradient methods; subclasses are frozen dataclasses (hashable: they key
    compiled programs)."""

    @abc.abstractmethod
    def value_and_grad(self, dyn: Dynamics, objective: Objective, lam) -> Solution:
        """f(λ) and ∇f(λ) for the training run ``dyn``; pure and traceable.

        ``objective(s, λ)`` receives the final training state s_T (a ``State``; for a run without
        model state, the trained arrays w_T alone will do). The hypergradient entry point wraps a
        user's objective so that it sees the whole model (:meth:`Dynamics.objective_at`).
        """

    def check(self, dyn: Dynamics) -> None:
        """Raise :class:`~hypergradient.errors.MethodError` if this method cannot serve ``dyn``."""

    def resolve(self, dyn: Dynamics, lam, objective: Objective | None = None) -> Method:
        """This method with any setting left to be chosen from a concrete λ filled in (the
        default has nothing to choose); ``objective(model, λ)``, when the caller has it, is the
        user's (``Auto`` measures its candidates' programs with it)."""
        return self

    def resolve_members(self, dyn: Dynamics, members: list, objective: Objective | None = None) -> Method:
        """This method resolved for a population whose members' λ are ``members``: one setting
        that serves them all. By default the first member's, which serves every member when the
        choice depends only on shapes."""
        return self.resolve(dyn, members[0], objective)

    def failure(self, result: Failure, stats: dict) -> Exception | None:
        """The exception for a method-specific failure code, with the run's ``stats`` (host side)."""
        return None


class Segmented(Method):
    """A method that differentiates the run one segment at a time, carrying what it needs between
    segments: the protocol of the real-time drivers (RTHO is Forward's segments, TRHO
    Truncated's). A whole-run hypergradient is the case of one segment of length T."""

    @abc.abstractmethod
    def start(self, dyn: Dynamics, lam, length: int) -> Any:
        """What the method carries at step 0 (at least s_0), for segments of ``length`` steps."""

    @abc.abstractmethod
    def segment(self, dyn: Dynamics, objective: Objective, carry, lam, start, length: int):
        """Run steps ``start .. start + length - 1`` from ``carry``; returns ``(carry, value, grad,
        losses)`` with ``value, grad`` the objective and its hypergradient at the segment's end."""

    @abc.abstractmethod
    def state(self, carry) -> Any:
        """The training state s_t held in ``carry``."""

    def value_and_grad(self, dyn: Dynamics, objective: Objective, lam) -> Solution:
        carry, value, grad, losses = self.segment(dyn, objective, self.start(dyn, lam, dyn.steps), lam, 0, dyn.steps)
        return solution(value, grad, self.state(carry), losses)
