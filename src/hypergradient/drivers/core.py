"""What the three drivers share; each keeps only its own loop.

- :class:`OptimizeResult`, the result of ``optimize`` and ``online``, and :class:`Best`, the
  lowest objective seen;
- :func:`check_arguments` and :func:`hyper_update`, the optax step followed by the projection;
- :class:`Store`, a driver's checkpoint file and the header naming its problem, and
  :class:`Tuning`, the state of a host-side loop over hyper-steps with ``resume`` and ``save``;
- the history's final form and the message of a divergence.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..dynamics import Dynamics, check_finite, check_hparams_dtype
from ..hypergrad import ProgramCache
from . import checkpoint as ckpt
from . import fingerprint

#: The hyperparameter trajectory is kept in the history only up to this many numbers per λ.
MAX_RECORDED_HPARAMS = 4096

#: The hyper-optimizer when none is given; one object, so compiled programs keyed on it are reused.
DEFAULT_HYPER_OPTIMIZER = optax.adam(1e-2)


class OptimizeResult(NamedTuple):
    """Result of :func:`~hypergradient.drivers.offline.optimize` and :func:`~hypergradient.drivers.online.online`.

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
    state: Any = None


class Best(NamedTuple):
    """The λ with the lowest objective seen, that objective and its hyper-step (-1: none yet)."""

    hparams: Any
    value: float = float("inf")
    step: int = -1

    def offer(self, hparams: Any, value: float, step: int) -> Best:
        """The better of this and ``(hparams, value, step)``; before any, the offer."""
        return Best(hparams, float(value), step) if value < self.value or self.step < 0 else self


# -- arguments and the hyper-update ----------------------------------------------

def as_hparams(lam0: Any) -> Any:
    """λ as a pytree of concrete, strongly typed floating arrays (a stable compile signature)."""
    lam = jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), lam0)
    check_hparams_dtype(lam)
    return lam


def recorded(lam: Any) -> bool:
    """Whether λ is small enough for the history to keep its trajectory."""
    return sum(int(np.size(x)) for x in jax.tree.leaves(lam)) <= MAX_RECORDED_HPARAMS


def check_arguments(dyn, lam0, hyper_optimizer, constraint, callback) -> Any:
    """The checks every driver makes of its arguments; λ0 as :func:`as_hparams` makes it."""
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


def hyper_update(hyper_optimizer: optax.GradientTransformation, constraint: Callable | None):
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


def jitted_update(hyper_optimizer: optax.GradientTransformation, constraint: Callable | None,
                  members: bool = False):
    """The jitted :func:`hyper_update` (vmapped over a population's ``members``), one per
    (optimizer, constraint) pair as :mod:`fingerprint` compares them, so that a later call with an
    equal pair (``optax.adam(0.1)`` written again) compiles nothing."""
    k = (fingerprint.key(hyper_optimizer), fingerprint.key(constraint), members)
    update = hyper_update(hyper_optimizer, constraint)
    return _updates.get_or_build(k, lambda: jax.jit(jax.vmap(update) if members else update))


# -- checkpoints and the state of a host-side loop ------------------------------------

def problem_header(dyn, lam, hyper_optimizer, constraint, member=None) -> dict:
    """What a checkpoint header holds to refuse another problem's run: the training steps, the
    weights' structure (of ``member``, one member's λ, default ``lam``) and digests of λ0, the
    hyper-optimizer and the constraint."""
    return {
        "train_steps": dyn.steps,
        "weights": ckpt.spec(jax.eval_shape(dyn.initial_state, lam if member is None else member)),
        "hparams0": fingerprint.digest(lam),
        "hyper_optimizer": fingerprint.digest(hyper_optimizer),
        "constraint": fingerprint.digest(constraint),
    }


class Store:
    """A driver's checkpoint, ``checkpoint_dir/<driver>``, and the header that names its problem
    (``header()``, built only when there is a directory). Without one (``path`` None) nothing is
    read or written."""

    def __init__(self, checkpoint_dir: str | os.PathLike | None, driver: str, header: Callable[[], dict]):
        self.path = None if checkpoint_dir is None else os.path.join(os.fspath(checkpoint_dir), driver)
        self.header = None if self.path is None else {"driver": driver, **header()}

    def load(self) -> ckpt.Checkpoint | None:
        """The stored checkpoint, checked to be of this problem; ``None`` when there is none."""
        saved = None if self.path is None else ckpt.load(self.path)
        if saved is not None:
            ckpt.check_header(saved, self.header)
        return saved

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path)

    def save(self, trees: dict, **fields) -> None:
        ckpt.save(self.path, trees, {**self.header, **fields})


def on_device(tree: Any) -> Any:
    return jax.tree.map(jnp.asarray, tree)


@dataclass(eq=False)
class Tuning:
    """The state of a host-side loop over hyper-steps, all that its checkpoint holds: λ, the
    hyper-optimizer's state, the best λ seen and the history (lists with one entry per finished
    hyper-step; ``hparams`` λ_k when λ is :func:`recorded`)."""

    hparams: Any
    opt_state: Any
    best: Best
    history: dict

    @classmethod
    def start(cls, lam, opt_state, best_template, record: bool) -> Tuning:
        history = {"value": [], "grad_norm": [], "seconds": [], **({"hparams": []} if record else {})}
        return cls(lam, opt_state, Best(best_template), history)

    def resume(self, store: Store) -> int:
        """Take the state stored in ``store``, if any; the number of hyper-steps it had finished."""
        saved = store.load()
        return 0 if saved is None else self.restore(saved)

    def restore(self, saved: ckpt.Checkpoint) -> int:
        """Take the state ``saved`` holds; the number of hyper-steps it had finished."""
        start = int(saved.header["step"])
        self.hparams = on_device(saved.restore("hparams", self.hparams))
        self.opt_state = on_device(saved.restore("opt_state", self.opt_state))
        self.best = Best(on_device(saved.restore("best_hparams", self.best.hparams)),
                         float(saved.header["best_value"]), int(saved.header["best_step"]))
        stored = saved.restore_dict("history")
        for k in ("value", "grad_norm", "seconds"):
            self.history[k] = list(stored.get(k, ()))
        if "hparams" in self.history:
            template = jax.tree.map(lambda x: np.zeros((start,) + x.shape, x.dtype), self.hparams)
            trajectory = saved.restore("hparams_trajectory", template)
            self.history["hparams"] = [jax.tree.map(lambda a, i=i: a[i], trajectory) for i in range(start)]
        return start

    def trees(self) -> dict:
        history = self.final_history()
        trees = {"hparams": self.hparams, "opt_state": self.opt_state, "best_hparams": self.best.hparams,
                 "history": {k: v for k, v in history.items() if k != "hparams"}}
        if "hparams" in history:
            trees["hparams_trajectory"] = history["hparams"]
        return trees

    def record(self, value, grad_norm, seconds: float) -> None:
        """Append a finished hyper-step's objective, ‖∇f‖ and wall time (and λ_k, the λ held now)."""
        self.history["value"].append(value)
        self.history["grad_norm"].append(grad_norm)
        self.history["seconds"].append(seconds)
        if "hparams" in self.history:
            self.history["hparams"].append(jax.tree.map(np.asarray, self.hparams))

    def fields(self, step: int) -> dict:
        return {"step": step, "best_value": self.best.value, "best_step": self.best.step}

    def save(self, store: Store, step: int) -> None:
        """Write the state after ``step`` finished hyper-steps to ``store``."""
        store.save(self.trees(), **self.fields(step))

    def final_history(self) -> dict:
        """The history as numpy arrays (``hparams``: λ's structure, stacked along a new axis)."""
        out = {k: np.asarray(v, dtype=np.float64) for k, v in self.history.items() if k != "hparams"}
        if "hparams" in self.history:
            rows = self.history["hparams"]
            out["hparams"] = (jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *rows) if rows else
                              jax.tree.map(lambda x: np.zeros((0,) + np.shape(x), np.asarray(x).dtype), self.hparams))
        return out


# -- divergence ------------------------------------------------------------------

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
