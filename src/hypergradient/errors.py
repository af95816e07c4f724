"""Every exception of hypergradient, and the codes by which a traced run reports failure.

Inside ``jit`` or ``vmap`` nothing can be raised: a run returns a :class:`Failure` code in
``Solution.result`` (an int array), and the host-side :func:`hypergradient.hypergrad` turns a
non-zero code into the exception below that names it.
"""

from __future__ import annotations

import enum


class Failure(enum.IntEnum):
    """Why a traced hypergradient run failed (``0``: it did not). Codes, not messages: they
    travel through ``jit`` and ``vmap`` as int32 arrays."""

    OK = 0
    TRAINING_DIVERGED = 1  # a training loss is NaN or inf
    OBJECTIVE_NONFINITE = 2  # training finite, f(λ) is not
    GRAD_NONFINITE = 3  # f(λ) finite, ∇f(λ) is not
    RANGE_OVERFLOW = 4  # Reversible: a value left the fixed-point range
    MOMENTUM_OUT_OF_RANGE = 5  # Reversible: μ outside [2^-b, 1]
    BUFFER_OVERFLOW = 6  # Reversible: the information buffer was too small
    REVERSAL_MISMATCH = 7  # Reversible: the backward pass did not re-create s_0 bit for bit
    NOT_STATIONARY = 8  # Implicit: w_T is not a stationary point of the training loss
    SOLVE_NOT_CONVERGED = 9  # Implicit: the linear solve did not reach its tolerance
    CHAOTIC = 10  # the backward pass grew so much that the hypergradient measures chaos, not a trend
    GRADIENT_NOT_REPRODUCED = 11  # Reversible: the backward pass's gradient at the same weights differed
    APPROXIMATION_UNSTABLE = 12  # DrMAD: the backward recursion along the approximate path blew up


class DivergenceError(FloatingPointError):
    """A training run (or its hypergradient) produced NaN or inf.

    Attributes:
      step: the first training step whose loss was not finite, or ``None``
        when training stayed finite but the objective or its gradient did not.
    """

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class HyperDivergenceError(DivergenceError):
    """Training diverged at some hyper-step of a driver.

    Attributes:
      hyper_step: the hyper-step whose training run (or hypergradient) was not finite.
      step: the first non-finite training step (``None``: the objective or its
        gradient, not training, went non-finite).
      hparams: the last good hyperparameters (those of the last hyper-step
        whose run was finite; λ_0 if the very first one diverged).
      history: the history up to the last good hyper-step.
      best_hparams, best_value, best_step: the λ with the lowest objective seen before the
        divergence, as the drivers' results give it (``None``, inf, -1 when none was finite).
    """

    def __init__(self, message: str, hyper_step: int, step: int | None, hparams, history: dict,
                 best: tuple = (None, float("inf"), -1)):
        super().__init__(message, step)
        self.hyper_step = hyper_step
        self.hparams = hparams
        self.history = history
        self.best_hparams, self.best_value, self.best_step = best


class MethodError(ValueError):
    """A method cannot serve the given dynamics (and the message says which can)."""


class ReversalError(MethodError):
    """Reversible could not reverse this training run exactly (the message says why and what to change)."""


class ImplicitWarning(UserWarning):
    """Implicit differentiation's assumptions did not hold (w_T not stationary, or the linear solve
    not converged): the hypergradient may be far off. ``Implicit(strict=True)`` raises instead."""


class UnusedHyperparameterWarning(UserWarning):
    """A leaf of λ that no part of the run reads: its hypergradient is zero (a misspelt key, or a
    λ shared with another run)."""


class ChaosWarning(UserWarning):
    """The backward pass grew by many orders of magnitude (``stats["backward_growth"]``): the run
    is chaotic in its weights and the hypergradient is dominated by that sensitivity.
    :func:`hypergradient.smoothness` checks whether it still describes the objective's slopes;
    evolution-strategy estimators (``hg.ES``, ``hg.PES``) estimate the gradient of the smoothed
    objective without a backward pass."""


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another problem (the message names what differs)."""


class ExperimentError(ValueError):
    """A configuration an experiment cannot run (the message says why)."""


class UnknownMethodError(KeyError):
    """A method name that the table of method names does not hold."""

    def __str__(self) -> str:
        return str(self.args[0])
