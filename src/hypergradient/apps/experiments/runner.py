"""One runner for every experiment: prepare → baseline → tune → score → report.

As in jaxline's ``experiment.py``, the runner owns the loop, the results folder
(``config.json``, ``checkpoints/``, ``history.csv``, ``result.json``; one run at a time), the
timing and what happens when training diverges; an experiment supplies only what differs, its
settings (a :class:`Config` with its own fields and per-dataset ``DEFAULTS``) and an
:class:`Experiment`::

    @dataclasses.dataclass(frozen=True)
    class Config(runner.Config):
        DEFAULTS = {"digits": {"n_train": 800, ...}, "paper": {"n_train": 10_000, ...}}
        steps: int = 100

    class Distill(Experiment):
        name, methods = NAME, METHODS

        def __init__(self, config, data): ...     # prepare: self.dynamics, self.objective, self.logits
        def baseline(self): ...                   # the untuned reference, any value
        def searches(self, baseline): ...         # [Search(label, λ_0, constraint)], one tuning run each
        def score(self, tuned): ...               # figures of one tuned λ (default: self.scores)
        def report(self, out_dir, baseline, tuned, scores): ...   # -> Report(fields, plots, history)

    def run(config, out_dir, progress=None):
        return runner.run(Distill, config, out_dir, progress)

The method named by ``config.method`` (:data:`hypergradient.apps.methods.METHODS`)
picks the driver: ``hg.online`` for a real-time one (Δ = ``config.every``),
``hg.optimize`` otherwise (the search's ``hyper_steps``, by default ``config.hyper_steps``);
both use Adam at ``config.hyper_lr`` and checkpoint under ``checkpoints/LABEL``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
import optax

import hypergradient as hg
from hypergradient.errors import ExperimentError

from .. import datasets, methods
from ..terminal import say
from . import folder, plots
from .scoring import metrics


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings every experiment has; an experiment's ``Config`` extends it with its own.

    Attributes:
      dataset, data_dir: which data (:func:`hypergradient.apps.datasets.load`).
      method: how to take the hypergradient, one of the experiment's ``methods``.
      hyper_steps: Adam steps on the hyperparameters (offline).
      hyper_lr: Adam's learning rate on the hyperparameters.
      seed: the experiment's randomness (weights, minibatch order, drawn examples).
      n_train, n_val, n_test: data sizes (``n_test`` on digits: the examples left).
      truncation: K for the truncated methods.

    A field left ``None`` takes the dataset's value from ``DEFAULTS`` (:meth:`resolved`).
    """

    #: The fields whose default depends on the dataset: their values on ``"digits"`` (small,
    #: bundled) and at the papers' scale (``"paper"``: Fashion-MNIST, MNIST).
    DEFAULTS: ClassVar[Mapping[str, Mapping[str, Any]]] = {"digits": {}, "paper": {}}

    dataset: str = "digits"
    data_dir: str | None = None
    method: str = "reverse"
    hyper_steps: int = 100
    hyper_lr: float = 0.05
    seed: int = 0
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    truncation: int | None = 20

    def resolved(self):
        """This config with each field left ``None`` set from the dataset's row of ``DEFAULTS``."""
        row = self.DEFAULTS["digits" if self.dataset == "digits" else "paper"]
        return dataclasses.replace(self, **{k: v for k, v in row.items() if getattr(self, k) is None})


@dataclasses.dataclass(frozen=True)
class Search:
    """One tuning run: its label (the checkpoint folder's name), λ_0, the projection after each step
    and, offline, the number of hyper-steps (``None``: ``config.hyper_steps``)."""

    label: str
    lam0: Any
    constraint: Callable | None = None
    hyper_steps: int | None = None


@dataclasses.dataclass(frozen=True)
class Tuned:
    """What one tuning run gave.

    Attributes:
      label: the :class:`Search`'s.
      hparams: the λ kept: offline, the one of lowest validation value among those visited;
        real time, the last one (the last good one if training diverged).
      params: the weights trained at (or, in real time, along with) ``hparams``; ``None`` if that
        training diverged.
      history: the driver's history (up to the last good hyper-step).
      selected_step: the hyper-step of ``hparams`` (``len(history["value"])``: the final λ).
      selected_value: the objective at ``hparams`` as the driver evaluated it (offline, the lowest
        seen; ``nan`` when unknown: real time after a divergence).
      note: ``""`` or what went wrong.
      seconds: wall time of the tuning run (offline, with the final training at ``hparams``).
    """

    label: str
    hparams: Any
    params: Any
    history: Mapping[str, Any]
    selected_step: int
    selected_value: float
    note: str
    seconds: float = float("nan")

    def selection(self) -> dict:
        """Which hyper-step's λ is reported, and its objective: result fields."""
        return {"selected_hyper_step": self.selected_step, "selected_value": self.selected_value}


@dataclasses.dataclass(frozen=True)
class Report:
    """An experiment's own result fields, the plots it wrote, the columns of history.csv and the
    names of the ``.npy`` arrays it wrote."""

    fields: dict
    plots: list[str]
    history: Mapping[str, Sequence]
    arrays: list[str] = dataclasses.field(default_factory=list)


class Experiment(abc.ABC):
    """What one experiment supplies to :func:`run`.

    ``__init__(config, data)`` is the prepare stage: it sets ``self.dynamics`` (the ``hg.Dynamics``
    tuned), ``self.objective`` (``(w, λ)``, or ``(w, λ, k)`` for a real-time method) and
    ``self.logits`` (``(w, x) -> logits``, which :meth:`scores` reads).

    :meth:`load_data` loads the data (an image dataset unless the experiment says otherwise).
    ``resumable_changes`` names the config fields a rerun may change and still resume from the
    checkpoints: by default more hyper-steps continue a finished run, and the data may move.
    """

    name: ClassVar[str]
    methods: ClassVar[tuple[str, ...]]
    resumable_changes: ClassVar[tuple[str, ...]] = ("hyper_steps", "data_dir")

    def __init__(self, config, data: datasets.Splits):
        self.config, self.data = config, data

    @abc.abstractmethod
    def baseline(self) -> Any:
        """The untuned reference (any value: :meth:`searches` and :meth:`report` receive it)."""

    @abc.abstractmethod
    def searches(self, baseline) -> list[Search]:
        """The tuning runs to make."""

    def score(self, tuned: Tuned) -> dict:
        """The figures of one tuned λ."""
        return self.scores(tuned.params)

    @abc.abstractmethod
    def report(self, out_dir: Path, baseline, tuned: list[Tuned], scores: list[dict]) -> Report:
        """The result's fields, the plots (written to ``out_dir``) and history.csv's columns."""

    @classmethod
    def load_data(cls, config):
        """The data of ``config`` (resolved): by default the image dataset's
        :class:`~hypergradient.apps.datasets.Splits`; ``__init__`` receives it."""
        return datasets.load(config.dataset, config.data_dir, n_train=config.n_train, n_val=config.n_val,
                             n_test=config.n_test)

    def train(self, hparams):
        """The final weights of training at ``hparams``, or ``None`` if training diverged."""
        try:
            return self.dynamics.run(hparams)
        except hg.DivergenceError:
            return None

    def scores(self, params) -> dict:
        """Validation and test loss and error of ``params`` (``None``, diverged: inf and 1)."""
        if params is None:
            return {"val_loss": float("inf"), "val_error": 1.0, "test_loss": float("inf"), "test_error": 1.0}
        val, test = self.data.val, self.data.test
        v, t = metrics(self.logits(params, val.x), val.y), metrics(self.logits(params, test.x), test.y)
        return {"val_loss": v["loss"], "val_error": v["error"], "test_loss": t["loss"], "test_error": t["error"]}


class _ResumeNotice(hg.ProgressMeter):
    """The progress meter ``progress`` asks for, a line saying how far a resumed run had got, and
    each finished hyper-step's objective appended to ``finished`` as ``(label, hyper-step, value)``
    (what an interrupted run writes to history.csv)."""

    def __init__(self, label: str, progress: bool | None, finished: list | None = None):
        self.label, self.finished, self.done = label, [] if finished is None else finished, 0
        if progress is False:
            self.inner = hg.NoProgressMeter()
        else:
            self.inner = hg.TqdmProgressMeter() if progress or sys.stderr.isatty() else hg.TextProgressMeter()

    def _start(self, total, initial, desc):
        if initial:
            detail(f"resuming {self.label} from its checkpoint: {initial} of {total} hyper-steps done")
        self.done = initial
        return self.inner._start(total, initial, desc)

    def _step(self, run, value):
        self.finished.append((self.label, self.done, value))
        self.done += 1
        self.inner._step(run, value)

    def _end(self, run):
        self.inner._end(run)


def detail(message: str) -> None:
    """A status line under the current stage's."""
    say("      " + message)


def grid_search(grid, scores_of, what: str) -> tuple[float, dict]:
    """The point of ``grid`` whose ``scores_of(point)`` has the lowest validation loss, and every
    point's scores; ``what`` names the points in the status line."""
    scores = {point: scores_of(point) for point in grid}
    best = min(scores, key=lambda point: scores[point]["val_loss"])
    detail(f"grid search over {len(scores)} {what}: best {best:g}, validation loss {scores[best]['val_loss']:.4f}")
    return best, scores


def run(experiment: type[Experiment], config, out_dir, progress: bool | None = None) -> dict:
    """Run ``experiment`` with ``config``; write its results folder ``out_dir``; return result.json's dict.

    Raises:
      ExperimentError: a method the experiment lacks, or another process running into ``out_dir``.
    """
    config = config.resolved()
    if config.method not in experiment.methods:
        raise ExperimentError(f"experiment {experiment.name!r} has no method {config.method!r}; "
                              f"choose one of: {', '.join(experiment.methods)}")
    started = time.perf_counter()
    data = load_data(experiment, config)  # before anything is written: data too small is refused first
    with folder.claim(Path(out_dir)) as out_dir:
        out_dir = folder.prepare(out_dir, config, experiment.resumable_changes)
        return _stages(experiment, config, data, out_dir, progress, started)


def _stages(experiment: type[Experiment], config, data: datasets.Splits, out_dir: Path, progress: bool | None,
            started: float) -> dict:
    say(f"[1/4] prepare: {config.dataset}, {len(data.train.y)} / {len(data.val.y)} / {len(data.test.y)} "
        "train / validation / test examples")
    exp = experiment(config, data)
    say("[2/4] baseline")
    base = exp.baseline()
    finished: list = []
    try:
        tuned = [_tune(exp, search, out_dir, progress, finished) for search in exp.searches(base)]
    except KeyboardInterrupt:
        _write_interrupted(out_dir, finished)
        raise
    say("[4/4] score")
    scores = [exp.score(t) for t in tuned]
    report = exp.report(out_dir, base, tuned, scores)
    result = {"experiment": experiment.name, "dataset": config.dataset, "method": config.method,
              **report.fields, "seconds": time.perf_counter() - started, "plots": report.plots,
              "arrays": report.arrays}
    folder.write_csv(out_dir / "history.csv", report.history)
    folder.write_json(out_dir / "result.json", result)
    (out_dir / plots.INTERRUPTED).unlink(missing_ok=True)
    return result


def problem(module, config) -> tuple[hg.Dynamics, Callable, Any]:
    """The training run, objective and first λ_0 (after the baseline) of the experiment in ``module``
    with ``config``, prepared and not tuned: what ``hypergradient plan`` examines."""
    kind = experiment_class(module)
    config = config.resolved()
    exp = kind(config, load_data(kind, config))
    return exp.dynamics, exp.objective, exp.searches(exp.baseline())[0].lam0


def experiment_class(module) -> type[Experiment]:
    """The :class:`Experiment` subclass the experiment ``module`` defines."""
    return next(v for v in vars(module).values()
                if isinstance(v, type) and issubclass(v, Experiment) and v.__module__ == module.__name__)


@functools.lru_cache(maxsize=1)
def load_data(experiment: type[Experiment], config) -> Any:
    """``experiment.load_data(config)``, kept for the next call with the same resolved ``config``: a
    command checks the data before it writes anything (:func:`check_data`) and then runs on them."""
    return experiment.load_data(config)


def check_data(module, config) -> None:
    """Raise what loading the data of ``config`` (resolved) for the experiment in ``module`` would
    (``ValueError``, ``FileNotFoundError``): a command checks this before it writes anything."""
    load_data(experiment_class(module), config.resolved())


def _write_interrupted(out_dir: Path, finished: list) -> None:
    """history.csv and a plot of the hyper-steps this process finished before Ctrl-C (the
    checkpoints hold the rest; the same command resumes, rewrites history.csv whole and removes
    the plot)."""
    if not finished:
        return
    labels, steps, values = zip(*finished)
    folder.write_csv(out_dir / "history.csv", {"search": list(labels), "hyper_step": list(steps),
                                                "value": list(values)})
    curves: dict = {}
    for label, step, value in finished:
        curves.setdefault(label, ([], []))
        curves[label][0].append(step)
        curves[label][1].append(value)
    plot = plots.finished_curves(out_dir, curves)
    say(f"wrote the {len(finished)} hyper-steps finished before the interruption to {out_dir / 'history.csv'} "
        f"and {out_dir / plot}")


def _tune(exp: Experiment, search: Search, out_dir: Path, progress, finished: list | None = None) -> Tuned:
    config = exp.config
    options = dict(method=methods.make(config.method, config.truncation),
                   hyper_optimizer=optax.adam(config.hyper_lr), constraint=search.constraint,
                   checkpoint_dir=out_dir / "checkpoints" / search.label,
                   progress=_ResumeNotice(search.label, progress, finished))
    size = sum(np.size(leaf) for leaf in jax.tree.leaves(search.lam0))
    started = time.perf_counter()
    if methods.METHODS[config.method].realtime:
        say(f"[3/4] tune {search.label}: {config.method} on {size} hyperparameters, one run of "
            f"{exp.dynamics.steps} steps, λ updated every {config.every} steps")
        with caveats_once(search.label):
            tuned = _online(exp, search, options)
    else:
        hyper_steps = config.hyper_steps if search.hyper_steps is None else search.hyper_steps
        say(f"[3/4] tune {search.label}: {hyper_steps} hyper-steps of Adam ({config.method}) "
            f"on {size} hyperparameters")
        with caveats_once(search.label):
            tuned = _offline(exp, search, hyper_steps, options)
    return dataclasses.replace(tuned, seconds=time.perf_counter() - started)


@contextlib.contextmanager
def caveats_once(label: str):
    """Gather the methods' caveats (``hg.ChaosWarning``, ``hg.ImplicitWarning``) raised in the block,
    one per hyper-step, and say each kind once when it ends, with the worst figure and how often
    it came (a 300-step run would otherwise print hundreds of multi-line warnings); other
    warnings pass through as they came."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        _say_once(label, caught)


def _say_once(label: str, caught: list) -> None:
    kinds = (hg.ChaosWarning, hg.ImplicitWarning)
    seen: dict[type, list[str]] = {}
    passed = set()
    for w in caught:
        if issubclass(w.category, kinds):
            seen.setdefault(w.category, []).append(str(w.message))
        elif (w.category, str(w.message), w.filename, w.lineno) not in passed:  # as the default filter would
            passed.add((w.category, str(w.message), w.filename, w.lineno))
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    for kind, messages in seen.items():
        worst = max(messages, key=_growth)
        times = f" at {len(messages)} hyper-steps; the worst" if len(messages) > 1 else ""
        say(f"warning: {label}: {kind.__name__}{times}: {worst}")


def _growth(message: str) -> float:
    """The figure a caveat names: how much the backward pass grew (inf where it overflowed)."""
    if "overflowed" in message:
        return float("inf")
    found = re.search(r"grew ([0-9.]+(?:e[+-]?[0-9]+)?)x", message)
    return float(found.group(1)) if found else 0.0


def _online(exp: Experiment, search: Search, options: dict) -> Tuned:
    """``hg.online``: the λ and weights the run ends with, or on divergence the last good λ, retrained."""
    try:
        res = hg.online(exp.dynamics, exp.objective, search.lam0, every=exp.config.every, **options)
        hparams, params, history, value, note = res.hparams, res.params, res.history, float(res.value), ""
    except hg.HyperDivergenceError as e:
        note = f"training diverged at hyper-step {e.hyper_step}; reporting the run with the last good λ fixed"
        say("warning: " + note)
        hparams, history, value = e.hparams, e.history, float("nan")
        params = exp.train(hparams)
    return Tuned(search.label, hparams, params, history, len(history["value"]), value, note)


def _offline(exp: Experiment, search: Search, hyper_steps: int, options: dict) -> Tuned:
    """``hg.optimize``, keeping the best λ seen.

    Every hyper-step evaluates f(λ_k) on the validation objective, so the
    λ returned is the one with the lowest validation value among those
    visited, the final one included (early stopping on the objective being
    optimized: a hyper-optimizer that overshoots late does not spoil the
    result). A divergence part-way is not fatal either: the experiment goes
    on with the best finite λ and says so.
    """
    note = ""
    try:
        res = hg.optimize(exp.dynamics, exp.objective, search.lam0, hyper_steps=hyper_steps, **options)
        final, best, history = (res.value, res.hparams, res.steps), (res.best_hparams, res.best_value,
                                                                     res.best_step), res.history
    except hg.HyperDivergenceError as e:
        note = f"{search.label}: training diverged at hyper-step {e.hyper_step}; kept the best λ before it"
        say("warning: " + note)
        final, best, history = (np.inf, e.hparams, -1), (e.best_hparams, e.best_value, e.best_step), e.history
    if final[0] <= best[1] or best[0] is None:  # on a tie, the final λ
        value, hparams, step = final
    else:
        hparams, value, step = best
    if np.isfinite(value):
        detail(f"selected the λ of hyper-step {step}{' (the final one)' if step == final[2] else ''}: "
               f"objective {value:.6g}, the lowest seen")
    return Tuned(search.label, hparams, exp.train(hparams), history, int(step), float(value), note)
