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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..dynamics import Dynamics, check_finite, check_hparams_dtype, first_nonfinite
from ..errors import DivergenceError, HyperDivergenceError
from ..hypergrad import evaluate, hypergrad
from ..methods.base import Method
from ..methods.reverse import Reverse
from ..hypergrad import ProgramCache
from . import checkpoint as ckpt
from . import fingerprint
from .population import optimize_population
from .progress import ProgressMeter, meter_for, tick

#: The hyperparameter trajectory is kept in the history only up to this many numbers per λ.
MAX_RECORDED_HPARAMS = 4096

CHECKPOINT_FILE = "optimize"

#: The hyper-optimizer when none is given; one object, so compiled programs keyed on it are reused.
DEFAULT_HYPER_OPTIMIZER = optax.adam(1e-2)


class OptimizeResult(NamedTuple):
    """Result of :func:`optimize` and :func:`~hypergradient.drivers.online.online`.

    Attributes:
      hparams: the final hyperparameters λ (after the last hyper-update and the constraint).
      params: the final weights. ``optimize``: w_T(λ) of the returned ``hparams``
        (one plain training run at the end). ``online``: the weights the single
        training run ended with (trained while λ moved).
      value: the objective at ``params`` and ``hparams``.
      history: numpy arrays with one row per hyper-step k: ``value`` (f at
        λ_k), ``grad_norm`` (‖∇f(λ_k)‖), ``seconds`` (wall time of the step;
        ``online``: of the compiled chunk, spread evenly) and, when λ has at
        most ``MAX_RECORDED_HPARAMS`` numbers, ``hparams`` (λ_k stacked along a
        new leading axis, λ's structure). ``online`` adds ``train_loss``
        (the training loss of every training step).
      steps: the number of hyper-steps taken (rows of the history).
      stopped: True when a callback stopped the run early.
      best_hparams: the λ with the lowest objective seen. ``optimize``: among every λ_k
        evaluated and the final λ; ``online``: among the λ in force during each interval
        (scored by the objective at the interval's end) and the final λ.
      best_value: that lowest objective.
      best_step: the hyper-step at which it was seen (``steps`` for the final λ).
      population_values: with ``population_axis``, every member's final objective (shape
        ``(K,)``); ``hparams``, ``params`` and ``value`` are then the best member's, and the
        history's ``value`` and ``grad_norm`` have one column per member.
    """

    hparams: Any
    params: Any
    value: float
    history: dict
    steps: int
    stopped: bool = False
    best_hparams: Any = None
    best_value: float = float("nan")
    best_step: int = -1
    population_values: Any = None


def divergence_message(driver: str, hyper_step: int, step: int | None, total_steps: int, cause: str,
                       good_step: int | None, checkpoint_note: str = "") -> str:
    where = (
        f"at training step {step} of {total_steps}" if step is not None
        else "(training stayed finite; the objective or the hypergradient did not)"
    )
    if good_step is None and hyper_step == 0:
        return (
            f"{driver}: training diverges at the initial hyperparameters λ0 {where}: {cause}. No hyper-step "
            f"was taken, so the hyper learning rate is not the cause.{checkpoint_note} Start from "
            f"hyperparameters that train (a smaller learning rate, a smaller init scale), or check the data "
            f"and the loss."
        )
    kept = (
        f"the last good hyperparameters (those of hyper-step {good_step}) are in error.hparams"
        if good_step is not None else "no hyper-step was finite; error.hparams holds λ_0"
    )
    return (
        f"{driver}: hyper-step {hyper_step} diverged {where}: {cause}. {kept}.{checkpoint_note} "
        f"Try a smaller hyper learning rate (e.g. optax.adam(1e-3) instead of 1e-2), a constraint that "
        f"keeps λ in a stable range (constraint=hg.constraints.box(lo, hi)), or a reparametrization "
        f"such as a log learning rate."
    )


# -- helpers shared with the online driver -----------------------------------------

def as_hparams(lam0: Any) -> Any:
    """λ as a pytree of concrete, strongly typed floating arrays (a stable compile signature)."""
    lam = jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), lam0)
    check_hparams_dtype(lam)
    return lam


def hparam_size(lam: Any) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(lam))


def tree_norm(tree: Any) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(x)))) for x in jax.tree.leaves(tree))))


def hyper_update_fn(hyper_optimizer: optax.GradientTransformation, constraint: Callable | None):
    """``(grad, opt_state, λ) -> (λ', opt_state')``: the optax step, then the projection.

    Pure and traceable; each leaf keeps its dtype so the compiled signature never changes.
    """

    def update(grad, opt_state, lam):
        updates, opt_state = hyper_optimizer.update(grad, opt_state, lam)
        new = optax.apply_updates(lam, updates)
        if constraint is not None:
            new = constraint(new)
        new = jax.tree.map(lambda n, old: jnp.asarray(n, old.dtype), new, lam)
        return new, opt_state

    return update


_updates = ProgramCache(32)


def jitted_update(hyper_optimizer: optax.GradientTransformation, constraint: Callable | None):
    """The jitted hyper-update, one per (optimizer, constraint) pair as :mod:`fingerprint` compares
    them, so that a later ``optimize`` with an equal pair (``optax.adam(0.1)`` written again)
    compiles nothing."""
    k = (fingerprint.key(hyper_optimizer), fingerprint.key(constraint))
    return _updates.get_or_build(k, lambda: jax.jit(hyper_update_fn(hyper_optimizer, constraint)))


def check_common(dyn, lam0, hyper_optimizer, constraint, callback):
    if not isinstance(dyn, Dynamics):
        raise TypeError(f"dyn must be a hypergradient.Dynamics, got {type(dyn).__name__}")
    if not (hasattr(hyper_optimizer, "init") and hasattr(hyper_optimizer, "update")):
        raise TypeError(f"hyper_optimizer must be an optax GradientTransformation (e.g. optax.adam(1e-2)), "
                        f"got {hyper_optimizer!r}")
    if constraint is not None and not callable(constraint):
        raise TypeError(f"constraint must be a callable λ -> λ (e.g. hg.constraints.nonnegative()), got {constraint!r}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be a function (step, hparams, value, grad) -> bool | None")
    lam = as_hparams(lam0)
    check_finite(lam, "hyperparameter")
    dyn.check_finite()
    if constraint is not None:
        projected = constraint(lam)
        if jax.tree.structure(projected) != jax.tree.structure(lam):
            raise ValueError(
                f"constraint changed the structure of λ: {jax.tree.structure(lam)} -> {jax.tree.structure(projected)}"
            )
    return lam


def new_history(record_hparams: bool) -> dict:
    h = {"value": [], "grad_norm": [], "seconds": []}
    if record_hparams:
        h["hparams"] = []
    return h


def finish_history(history: dict, lam_template: Any) -> dict:
    """Lists of per-step entries -> numpy arrays (``hparams``: λ's structure, stacked)."""
    out = {k: np.asarray(v, dtype=np.float64) for k, v in history.items() if k != "hparams"}
    if "hparams" in history:
        rows = history["hparams"]
        if rows:
            out["hparams"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *rows)
        else:
            out["hparams"] = jax.tree.map(lambda x: np.zeros((0,) + np.shape(x), np.asarray(x).dtype), lam_template)
    return out


# -- the driver ------------------------------------------------------------------

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
        keeps its λ and scores inf. Not with ``callback``.

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
    if isinstance(hyper_steps, bool) or not isinstance(hyper_steps, (int, np.integer)) or hyper_steps < 0:
        raise ValueError(f"hyper_steps must be a non-negative int, got {hyper_steps!r}")
    if population_axis is not None:
        if callback is not None:
            raise ValueError("optimize: population_axis runs K members at once and takes no callback")
        lam = as_hparams(lam0)
        check_common(dyn, jax.tree.map(lambda x: jnp.take(x, 0, axis=population_axis), lam), hyper_optimizer,
                     constraint, None)
        return optimize_population(dyn, objective, lam, method, hyper_optimizer, hyper_steps, constraint,
                                   checkpoint_dir, progress, population_axis,
                                   hyper_update_fn(hyper_optimizer, constraint), OptimizeResult)
    lam = check_common(dyn, lam0, hyper_optimizer, constraint, callback)
    lam_template = lam
    opt_state = hyper_optimizer.init(lam)
    record = hparam_size(lam) <= MAX_RECORDED_HPARAMS
    history = new_history(record)
    good = lam  # the last λ whose run was finite
    good_step: int | None = None
    best, best_value, best_step = lam, np.inf, -1  # the lowest objective seen
    start = 0

    path = None
    header = {
        "driver": "optimize",
        "train_steps": dyn.steps,
        "weights": ckpt.spec(jax.eval_shape(dyn.initial_state, lam)),
        "hparams0": fingerprint.digest(lam),
        "hyper_optimizer": fingerprint.digest(hyper_optimizer),
        "constraint": fingerprint.digest(constraint),
    }
    if checkpoint_dir is not None:
        path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_FILE)
        saved = ckpt.load(path)
        if saved is not None:
            ckpt.check_header(saved, header)
            lam = _device(saved.restore("hparams", lam))
            good = _device(saved.restore("good_hparams", lam))
            opt_state = _device(saved.restore("opt_state", opt_state))
            start = int(saved.header["step"])
            good_step = saved.header["good_step"]
            best = _device(saved.restore("best_hparams", lam))
            best_value, best_step = float(saved.header["best_value"]), int(saved.header["best_step"])
            stored = saved.restore_dict("history")
            for k in ("value", "grad_norm", "seconds"):
                history[k] = list(stored.get(k, np.zeros(0)))
            if record:
                template = jax.tree.map(lambda x: np.zeros((start,) + x.shape, x.dtype), lam_template)
                traj = saved.restore("hparams_trajectory", template)
                history["hparams"] = [jax.tree.map(lambda a, i=i: a[i], traj) for i in range(start)]

    def write_checkpoint(step):
        trees = {
            "hparams": lam,
            "good_hparams": good,
            "best_hparams": best,
            "opt_state": opt_state,
            "history": {k: np.asarray(v, np.float64) for k, v in history.items() if k != "hparams"},
        }
        if record:
            trees["hparams_trajectory"] = finish_history({"hparams": history["hparams"]}, lam_template)["hparams"]
        ckpt.save(path, trees, {**header, "step": step, "good_step": good_step, "best_value": best_value,
                                "best_step": best_step})

    update = jitted_update(hyper_optimizer, constraint)
    meter = meter_for(progress)
    run = meter.open(hyper_steps, min(start, hyper_steps))
    stopped = False
    try:
        with ckpt.Periodic(path, write_checkpoint, start) as saving:
            for k in range(start, hyper_steps):
                t0 = time.perf_counter()
                try:
                    res = hypergrad(dyn, objective, lam, method)
                except DivergenceError as e:
                    note = (f" The checkpoint in {checkpoint_dir} holds the state before this hyper-step "
                            f"(resuming would diverge again: change the settings or the directory).") if path else ""
                    raise HyperDivergenceError(
                        divergence_message("optimize", k, e.step, dyn.steps, str(e), good_step, note),
                        k, e.step, good, finish_history(history, lam_template), (best, best_value, best_step),
                    ) from e
                value = float(res.value)
                good, good_step = lam, k
                if value < best_value:
                    best, best_value, best_step = lam, value, k
                stop = bool(callback(k, lam, value, res.grad)) if callback is not None else False
                if not stop:
                    new_lam, opt_state = update(res.grad, opt_state, lam)
                history["value"].append(value)
                history["grad_norm"].append(tree_norm(res.grad))
                history["seconds"].append(time.perf_counter() - t0)
                if record:
                    history["hparams"].append(jax.tree.map(np.asarray, lam))
                tick(run, value)
                if stop:
                    stopped = True
                    break
                lam = new_lam
                saving.done(k + 1, last=k + 1 == hyper_steps)
    finally:
        meter.close(run)

    params, value, losses = evaluate(dyn, objective, lam)
    step = first_nonfinite(losses)
    if step is not None:
        k = len(history["value"])
        raise HyperDivergenceError(
            divergence_message("optimize", k, step, dyn.steps, "training at the final hyperparameters "
                               f"(after the last update) diverged at step {step}", good_step),
            k, step, good, finish_history(history, lam_template), (best, best_value, best_step),
        )
    value = float(value)
    steps = len(history["value"])
    if value < best_value or best_step < 0:
        best, best_value, best_step = lam, value, steps
    return OptimizeResult(lam, params, value, finish_history(history, lam_template), steps, stopped,
                          best, best_value, best_step)


def _device(tree):
    return jax.tree.map(jnp.asarray, tree)
