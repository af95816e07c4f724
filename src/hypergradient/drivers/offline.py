"""Offline hyperparameter optimization: one full training run per hyper-step.

    for k = 0..N-1:
        f(λ_k), ∇f(λ_k) = hypergrad(dyn, objective, λ_k, method)   # train from scratch, differentiate
        λ_{k+1} = constraint(λ_k + hyper_optimizer.update(∇f(λ_k)))

The hypergradient program is compiled once (``hypergrad``'s cache) and
reused at every hyper-step; so is the hyper-update (optax step + constraint),
and both are reused by later calls with the same objects.
With ``checkpoint_dir`` the driver's whole state is written atomically after
every hyper-step and a later call with the same directory resumes from it;
everything the run computes is a deterministic function of that state (the
minibatches are a function of the training step), so a resumed run ends
exactly where an uninterrupted one would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import optax

from .._checks import check_int
from .._pytree import tree_norm
from ..dynamics import Dynamics, first_nonfinite
from ..errors import DivergenceError, HyperDivergenceError
from ..hypergrad import evaluate, hypergrad
from ..methods.base import Method
from ..methods.reverse import Reverse
from . import checkpoint as ckpt
from .core import (
    DEFAULT_HYPER_OPTIMIZER,
    OptimizeResult,
    Store,
    Tuning,
    check_arguments,
    divergence_message,
    jitted_update,
    on_device,
    problem_header,
    recorded,
)
from .population import optimize_population
from .progress import ProgressMeter, meter_for, tick


def optimize(
    dyn: Dynamics,
    objective: Callable[[Any, Any], jax.Array],
    lam0: Any,
    method: Method | None = None,
    hyper_optimizer: optax.GradientTransformation | None = None,
    hyper_steps: int = 100,
    constraint: Callable[[Any], Any] | None = None,
    callback: Callable[[int, Any, float, Any], bool | None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool | ProgressMeter | None = None,
    population_axis: int | None = None,
) -> OptimizeResult:
    """Tune λ by gradient descent on f(λ) = objective(w_T(λ), λ), training from scratch each hyper-step.

    Args:
      dyn: the training run.
      objective: ``(w, λ) -> scalar``, the outer objective at the final weights.
      lam0: the initial hyperparameters (a pytree of floating-point arrays).
      method: how to take the hypergradient (default ``hg.Reverse()``).
      hyper_optimizer: an optax optimizer over λ (default ``optax.adam(1e-2)``).
      hyper_steps: the total number of hyper-steps N (a resumed run counts the
        steps already done).
      constraint: a projection ``λ -> λ`` applied after every hyper-update
        (``hg.constraints.box(...)``, or any traceable function).
      callback: ``callback(step, hparams, value, grad)``, called at every
        hyper-step with λ_k, f(λ_k) and ∇f(λ_k) before λ is updated; returning
        True stops the run there, returning λ_k (the hyperparameters the
        callback saw) without applying that step's update.
      checkpoint_dir: a directory; the driver's state (λ, the hyper-optimizer
        state, the history, the step) is written to ``checkpoint_dir/optimize``
        atomically (orbax) after a hyper-step when ``checkpoint.CHECKPOINT_SECONDS`` have
        passed since the last write, after the last one, and when the run is
        interrupted (Ctrl-C) or fails; a call with the same
        directory resumes from it. A checkpoint of another problem (other
        structure or shapes of λ, weights or optimizer state, or another
        number of training steps) is refused with ``CheckpointMismatchError``.
        The history's ``seconds`` of the steps before a resume are those of
        the first process.
      progress: a :class:`~hypergradient.drivers.progress.ProgressMeter`, or ``True``
        (a tqdm bar with the objective), ``False`` (nothing), ``None`` (default: a bar
        when stderr is a terminal, a line every 10 s otherwise).
      population_axis: run K independent tuning runs at once: every leaf of ``lam0`` has
        the K members on this axis, and each hyper-step is one vmapped program (sharded
        when ``lam0`` is, e.g. ``hg.data.shard(lam0, mesh, "pop")``). A member that diverges
        keeps its λ and scores inf; so does a runaway objective (``|f|`` > 1e30, or > 1e6 × the
        members' median ``|f|``). Not with ``callback``.

    Returns:
      An :class:`OptimizeResult`. ``params`` and ``value`` come from one
      plain training run at the returned ``hparams`` (the last hypergradient
      was taken at the hyperparameters *before* the last update);
      ``best_hparams``, ``best_value`` and ``best_step`` name the lowest
      objective seen, the final λ included.

    Raises:
      HyperDivergenceError: a hyper-step's training run diverged; the error
        names the hyper-step and training step and holds the last good λ.
      MethodError: the method cannot serve the dynamics.
      CheckpointMismatchError: ``checkpoint_dir`` holds another problem's checkpoint.
    """
    method = Reverse() if method is None else method
    hyper_optimizer = DEFAULT_HYPER_OPTIMIZER if hyper_optimizer is None else hyper_optimizer
    hyper_steps = check_int("hyper_steps", hyper_steps, minimum=0)
    if population_axis is not None:
        return optimize_population(dyn, objective, lam0, population_axis, method=method,
                                   hyper_optimizer=hyper_optimizer, hyper_steps=hyper_steps, constraint=constraint,
                                   callback=callback, checkpoint_dir=checkpoint_dir, progress=progress)
    lam = check_arguments(dyn, lam0, hyper_optimizer, constraint, callback)
    state = _Offline.start(lam, hyper_optimizer.init(lam), lam, recorded(lam))
    store = Store(checkpoint_dir, "optimize", lambda: problem_header(dyn, lam, hyper_optimizer, constraint))
    stopped = _tune(state, store, hyper_steps, dyn, objective, method, jitted_update(hyper_optimizer, constraint),
                    callback, progress)
    return _result(state, dyn, objective, stopped)


def _tune(state: _Offline, store: Store, hyper_steps: int, dyn, objective, method, update, callback,
          progress) -> bool:
    """Resume from ``store`` and take the hyper-steps up to ``hyper_steps``; whether the callback stopped them."""
    start = state.resume(store)
    stopped = False
    with meter_for(progress).running(hyper_steps, min(start, hyper_steps)) as run, \
            ckpt.Periodic(store.path, partial(state.save, store), start) as saving:
        for k in range(start, hyper_steps):
            t0 = time.perf_counter()
            res = state.hypergradient(k, dyn, objective, method, store)
            value = float(res.value)
            stopped = callback is not None and bool(callback(k, state.hparams, value, res.grad))
            new = None if stopped else update(res.grad, state.opt_state, state.hparams)
            with ckpt.sigint_held():
                state.good, state.good_step = state.hparams, k
                state.best = state.best.offer(state.hparams, value, k)
                state.record(value, float(tree_norm(res.grad)), time.perf_counter() - t0)
                if not stopped:
                    state.hparams, state.opt_state = new
                    saving.done(k + 1, last=k + 1 == hyper_steps)
            tick(run, value)
            if stopped:
                break
    return stopped


@dataclass(eq=False)
class _Offline(Tuning):
    """:class:`~hypergradient.drivers.core.Tuning` with the last good λ, that of the last hyper-step
    whose run was finite (λ0 before any), which a divergence hands back."""

    good: Any = None
    good_step: int | None = None

    def __post_init__(self):
        self.good = self.hparams if self.good is None else self.good

    def restore(self, saved: ckpt.Checkpoint) -> int:
        start = super().restore(saved)
        self.good = on_device(saved.restore("good_hparams", self.hparams))
        self.good_step = saved.header["good_step"]
        return start

    def trees(self) -> dict:
        return {**super().trees(), "good_hparams": self.good}

    def fields(self, step: int) -> dict:
        return {**super().fields(step), "good_step": self.good_step}

    def hypergradient(self, k: int, dyn, objective, method, store: Store):
        """f(λ_k) and ∇f(λ_k); a divergence is raised as :class:`HyperDivergenceError`."""
        try:
            return hypergrad(dyn, objective, self.hparams, method)
        except DivergenceError as e:
            note = (f" The checkpoint in {store.directory} holds the state before this hyper-step "
                    f"(resuming would diverge again: change the settings or the directory).") if store.path else ""
            raise self.diverged(k, e.step, dyn, str(e), note) from e

    def diverged(self, k: int, step: int | None, dyn, cause: str, note: str = "") -> HyperDivergenceError:
        return HyperDivergenceError(divergence_message("optimize", k, step, dyn.steps, cause, self.good_step, note),
                                    k, step, self.good, self.final_history(), self.best)


def _result(state: _Offline, dyn, objective, stopped: bool) -> OptimizeResult:
    """The result at the final λ, from one plain training run there (refused when it diverges)."""
    params, value, losses, held = evaluate(dyn, objective, state.hparams)
    steps = len(state.history["value"])
    step = first_nonfinite(losses)
    if step is not None:
        raise state.diverged(steps, step, dyn, "training at the final hyperparameters "
                             f"(after the last update) diverged at step {step}")
    best = state.best.offer(state.hparams, float(value), steps)
    return OptimizeResult(state.hparams, params, float(value), state.final_history(), steps, stopped, *best,
                          state=held)
