"""Gradient against black box: random search, Optuna TPE and hypergradient descent at equal budget.

    hypergradient compare schedules --dataset fashion-mnist --budget-seconds 120 --seeds 2

Every method tunes the same hyperparameters λ of the same training run
(same data split, same initial weights and minibatch order for a given seed)
on the same objective, the validation cross-entropy at the final weights
f(λ) = E_val(w_T(λ)), within the same wall-clock budget per method, regime
and seed:

- ``random``: Optuna's ``RandomSampler`` (log-uniform learning rates and L2
  strengths, uniform momenta), one plain training run per trial;
- ``tpe``: Optuna's ``TPESampler``, with a ``MedianPruner`` on the validation
  loss after each quarter of the training run;
- ``hypergradient``: ``hg.optimize`` with ``hg.Reverse()`` and Adam on λ
  (one training run plus its reverse pass per hyper-step);
- ``online``: ``hg.online`` (RTHO with ``hg.Forward()`` for the few
  hyperparameters, TRHO with ``hg.Truncated(Δ)`` for the many), repeated:
  each pass is one training run during which λ moves every Δ steps, the next
  pass starts from the λ the previous one ended with.

Two regimes: ``few`` (one learning rate, one momentum, one L2 strength) and
``many`` (a learning rate and a momentum per training step and per layer,
and an L2 strength per layer: 2·T·L + L numbers). All methods search the same
box (the black-box samplers draw from it, the gradient methods are projected
onto it) and the gradient methods start from its centre.

Compilation is excluded from every method's clock: each regime's programs
are compiled once, before any clock starts, and reused by every trial and
hyper-step (``hg.online`` compiles its loop in the first pass and reuses it
after; that compile is subtracted, see :func:`_online_loop_seconds`). Writes to the Optuna storage
are excluded too (they are the machinery of resuming, which the other
methods do not pay).

Outputs in ``--out``: ``trace.csv``, ``summary.csv``, ``summary.md``,
``trace.png``, the Optuna storage (``optuna.journal`` unless ``--storage``)
and ``runs/`` (one JSON per finished gradient run). Running the same command
again resumes: the black-box studies continue from their storage (with a
larger ``--budget-seconds`` they get the extra time), finished gradient runs
with the same budget are read back, not redone.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("random", "tpe", "hypergradient", "online")
REGIMES = ("few", "many")
DATASETS = ("digits", "fashion-mnist", "mnist")
PRUNING_CHUNKS = 4  # TPE reports the validation loss after each quarter of the training run

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the search space ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Axis:
    """One entry of λ: ``shape`` numbers, each in ``[lo, hi]`` in natural units.

    λ stores ``log x`` (``scale="log"``: sampled log-uniformly) or ``logit x``
    (``scale="logit"``: sampled uniformly), so that gradient steps are
    unconstrained apart from the box.
    """

    label: str
    shape: tuple[int, ...]
    lo: float
    hi: float
    scale: str  # "log" | "logit"

    def to_lam(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self.scale == "log":
            return np.log(x)
        x = np.clip(x, 1e-6, 1 - 1e-6)
        return np.log(x / (1 - x))

    def bounds(self) -> tuple[float, float]:
        """The box in λ's units."""
        lo, hi = self.to_lam(np.array([self.lo, self.hi]))
        return float(lo), float(hi)

    def centre(self) -> float:
        if self.scale == "log":
            return float(np.sqrt(self.lo * self.hi))
        return 0.5 * (self.lo + self.hi)

    def names(self) -> list[str]:
        if not self.shape:
            return [self.label]
        return [f"{self.label}[{','.join(map(str, idx))}]" for idx in np.ndindex(*self.shape)]


Space = Mapping[str, Axis]


def space_size(space: Space) -> int:
    return sum(int(np.prod(a.shape, dtype=int)) for a in space.values())


def lam_centre(space: Space) -> dict:
    import jax.numpy as jnp

    return {k: jnp.full(a.shape, a.to_lam(np.array(a.centre())), jnp.float32) for k, a in space.items()}


def lam_from_params(space: Space, params: Mapping[str, float]) -> dict:
    """λ from an Optuna trial's parameters (natural units)."""
    import jax.numpy as jnp

    out = {}
    for k, a in space.items():
        x = np.array([params[n] for n in a.names()], np.float64).reshape(a.shape)
        out[k] = jnp.asarray(a.to_lam(x), jnp.float32)
    return out


def suggest(trial, space: Space) -> dict:
    """Draw every number of λ from the trial (log-uniform or uniform over the box)."""
    params = {}
    for a in space.values():
        for n in a.names():
            params[n] = trial.suggest_float(n, a.lo, a.hi, log=a.scale == "log")
    return lam_from_params(space, params)


def box_constraint(space: Space) -> Callable:
    """The projection of λ onto the search box (traceable)."""
    import jax.numpy as jnp

    bounds = {k: a.bounds() for k, a in space.items()}

    def project(lam):
        return {k: jnp.clip(v, *bounds[k]).astype(v.dtype) for k, v in lam.items()}

    return project


# -- problems: what each experiment contributes ----------------------------------------------

@dataclasses.dataclass
class Problem:
    """One regime of an experiment, built once; every method and seed reuses its functions.

    Attributes:
      regime: ``"few"`` or ``"many"``.
      space: the hyperparameters λ and their box.
      dynamics: ``seed -> hg.Dynamics``; the functions are shared across
        seeds (only arrays differ), so compiled programs are reused.
      objective: ``(w, λ) -> validation loss``.
      test: ``w -> (test loss, test error)``, jitted.
      online_method, online_every: the real-time method and Δ.
      hyper_lr: Adam's learning rate on λ for the gradient methods.
    """

    regime: str
    space: Space
    dynamics: Callable[[int], Any]
    objective: Callable
    test: Callable
    online_method: Any
    online_every: int
    hyper_lr: float
    description: str


def schedules_problems(dataset: str, data_dir: str | None, tiny: bool, regimes: Sequence[str]) -> dict[str, Problem]:
    """The ``schedules`` experiment's task (its Config and sizes) with two parametrizations.

    The tanh MLP, data sizes, batch size and T are those of
    ``hypergradient.apps.experiments.schedules`` (``tiny()`` with ``--tiny``);
    momentum SGD in Maclaurin et al.'s form (v ← μv + (1−μ)g, w ← w − ηv)
    with an L2 penalty Σ_l ρ_l ||W_l||² in the training loss.

    - few: η, μ, ρ shared by all steps and layers (3 numbers);
    - many: η[t, l], μ[t, l] per step and layer, ρ[l] per layer (2TL + L).
    """
    import jax
    import jax.numpy as jnp

    import hypergradient as hg
    from hypergradient.apps import datasets, models
    from hypergradient.apps.experiments import schedules

    config = (schedules.tiny(dataset) if tiny else schedules.Config(dataset=dataset))
    config = dataclasses.replace(config, data_dir=data_dir).resolved()
    data = datasets.load(config.dataset, config.data_dir, n_train=config.n_train, n_val=config.n_val,
                         n_test=config.n_test)
    sizes = (data.train.x.shape[1], *config.hidden, data.n_classes)
    layers, T = len(sizes) - 1, config.steps
    xv, yv = jnp.asarray(data.val.x), jnp.asarray(data.val.y)
    xt, yt = jnp.asarray(data.test.x), jnp.asarray(data.test.y)
    train = (jnp.asarray(data.train.x), jnp.asarray(data.train.y))

    def objective(w, lam):
        return models.cross_entropy(models.mlp_apply(w, xv), yv)

    @jax.jit
    def test(w):
        logits = models.mlp_apply(w, xt)
        return models.cross_entropy(logits, yt), models.error_rate(logits, yt)

    lr = lambda shape: Axis("lr", shape, 1e-3, 10.0, "log")  # noqa: E731
    mom = lambda shape: Axis("momentum", shape, 0.0, 0.99, "logit")  # noqa: E731
    l2 = lambda shape: Axis("l2", shape, 1e-6, 1e-1, "log")  # noqa: E731
    every = max(1, T // 10)
    out = {}
    for regime in regimes:
        if regime == "few":
            space = {"log_lr": lr(()), "logit_momentum": mom(()), "log_l2": l2(())}

            def optimizer_hparams(lam, t):
                return {"lr": jnp.exp(lam["log_lr"]), "momentum": jax.nn.sigmoid(lam["logit_momentum"])}

            online_method = hg.Forward()
        else:
            space = {"log_lr": lr((T, layers)), "logit_momentum": mom((T, layers)), "log_l2": l2((layers,))}

            def optimizer_hparams(lam, t):
                return {"lr": list(jnp.exp(lam["log_lr"][t])),
                        "momentum": list(jax.nn.sigmoid(lam["logit_momentum"][t]))}

            online_method = hg.Truncated(every)

        def loss(w, lam, batch):
            x, y = batch
            return models.cross_entropy(models.mlp_apply(w, x), y) + models.l2_penalty(w, jnp.exp(lam["log_l2"]))

        optimizer = hg.optim.momentum(dampen=True)

        def dynamics(seed, loss=loss, optimizer_hparams=optimizer_hparams, optimizer=optimizer):
            key = jax.random.PRNGKey(seed)
            return hg.Dynamics(
                init=models.mlp_init(jax.random.fold_in(key, 0), sizes),  # arrays: one compile for every seed
                loss=loss,
                optimizer=optimizer,
                optimizer_hparams=optimizer_hparams,
                data=hg.Batches(train, config.batch_size, key=jax.random.fold_in(key, 1)),
                steps=T,
            )

        out[regime] = Problem(
            regime=regime, space=space, dynamics=dynamics, objective=objective, test=test,
            online_method=online_method, online_every=every, hyper_lr=config.hyper_lr,
            description=(f"tanh MLP {'-'.join(map(str, sizes))}, T={T}, batch {config.batch_size}, "
                         f"{config.n_train}/{config.n_val}/{len(data.test.y)} train/val/test"),
        )
    return out


#: experiment name -> builder ``(dataset, data_dir, tiny, regimes) -> {regime: Problem}``.
EXPERIMENTS: dict[str, Callable[..., dict[str, Problem]]] = {"schedules": schedules_problems}


# -- timing --------------------------------------------------------------------------------

class Clock:
    """Seconds spent by one method, starting at ``offset``; ``paused()`` excludes a block."""

    def __init__(self, offset: float = 0.0):
        self.offset = offset
        self.start = time.perf_counter()
        self.excluded = 0.0

    def __call__(self) -> float:
        return self.offset + time.perf_counter() - self.start - self.excluded

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds


class Paused:
    def __init__(self, clock: Clock):
        self.clock = clock

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.clock.exclude(time.perf_counter() - self.t0)


@dataclasses.dataclass
class Run:
    """One method on one regime and seed: the trace and the final choice."""

    method: str
    regime: str
    seed: int
    trace: list  # [(seconds, best validation loss so far)], seconds within the budget
    choice: dict | None  # λ (numpy) with the best validation loss, or None if nothing finished
    evaluations: int
    note: str = ""
    test_loss: float = float("nan")
    test_error: float = float("nan")
    val_loss: float = float("nan")

    @property
    def best_val(self) -> float:
        return self.trace[-1][1] if self.trace else float("inf")


class Tracker:
    """Best validation loss so far, recorded only within the budget."""

    def __init__(self, budget: float):
        self.budget = budget
        self.trace: list = []
        self.best = float("inf")
        self.choice = None
        self.evaluations = 0

    def add(self, seconds: float, value: float, lam) -> None:
        if seconds > self.budget:
            return
        self.evaluations += 1
        if np.isfinite(value) and value < self.best:
            self.best = float(value)
            self.choice = {k: np.asarray(v) for k, v in lam.items()}
            self.trace.append((float(seconds), self.best))


# -- compiled pieces shared by every method of a regime ---------------------------------------

class Programs:
    """The jitted programs of one regime, compiled once (before any clock starts)."""

    def __init__(self, problem: Problem):
        import jax

        self.problem = problem
        self.val = jax.jit(problem.objective)
        dyn = problem.dynamics(0)
        T = dyn.steps
        self.chunks = PRUNING_CHUNKS if T % PRUNING_CHUNKS == 0 and T >= PRUNING_CHUNKS else 1
        K = T // self.chunks
        objective = problem.objective

        @jax.jit
        def initial(dyn, lam):
            return dyn.initial_state(lam)

        @jax.jit
        def segment(dyn, state, lam, start):
            state, losses = dyn.rollout(state, lam, start, K)
            return state, losses, objective(state.params, lam)

        self.initial, self.segment, self.K = initial, segment, K
        # One constraint and one optimizer object per hyper learning rate, so that every pass of
        # hg.online (and every seed) hits its cache of compiled loops.
        self.box = box_constraint(problem.space)
        self._adam: dict[float, Any] = {}

    def adam(self, lr: float):
        """``optax.adam(lr)``, one object per ``lr``."""
        import optax

        if lr not in self._adam:
            self._adam[lr] = optax.adam(lr)
        return self._adam[lr]

    def warm_up(self, methods: Sequence[str]) -> float:
        """Compile every program the methods will call; returns the seconds it took."""
        import jax
        import jax.numpy as jnp

        import hypergradient as hg

        t0 = time.perf_counter()
        dyn = self.problem.dynamics(0)
        lam = lam_centre(self.problem.space)
        if "random" in methods or "online" in methods:
            self.evaluate(dyn, lam)
        if "tpe" in methods:
            state = self.initial(dyn, lam)
            jax.block_until_ready(self.segment(dyn, state, lam, jnp.asarray(0, jnp.int32)))
        if "hypergradient" in methods:
            try:
                hg.hypergrad(dyn, self.problem.objective, lam, hg.Reverse())
            except hg.DivergenceError:
                pass
        jax.block_until_ready(self.problem.test(dyn.run(lam)))
        return time.perf_counter() - t0

    def evaluate(self, dyn, lam) -> float:
        """f(λ): one plain training run and the validation loss (``inf`` if training diverged)."""
        import hypergradient as hg

        try:
            w = dyn.run(lam)
        except hg.DivergenceError:
            return float("inf")
        value = float(self.val(w, lam))
        return value if np.isfinite(value) else float("inf")

    def evaluate_chunked(self, dyn, lam, report: Callable[[float, int], bool]) -> float | None:
        """f(λ) in ``chunks`` pieces, ``report(value, i)`` after each but the last; ``None`` if pruned."""
        import jax.numpy as jnp

        state = self.initial(dyn, lam)
        for i in range(self.chunks):
            state, losses, value = self.segment(dyn, state, lam, jnp.asarray(i * self.K, jnp.int32))
            value = float(value)
            if not (np.isfinite(value) and np.isfinite(np.asarray(losses)).all()):
                return float("inf")
            if i < self.chunks - 1 and report(value, i):
                return None
        return value


# -- the methods ---------------------------------------------------------------------------------

def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_storage(spec: str):
    """An Optuna storage: a URL (``sqlite:///study.db``) or a path to a journal file."""
    optuna = _optuna()
    if "://" in spec:
        return optuna.storages.RDBStorage(spec) if spec.startswith(("sqlite", "postgresql", "mysql")) else spec
    try:
        from optuna.storages.journal import JournalFileBackend as Backend
    except ImportError:  # optuna < 4
        from optuna.storages import JournalFileStorage as Backend
    return optuna.storages.JournalStorage(Backend(spec))


def study_name(experiment: str, dataset: str, tiny: bool, regime: str, method: str, seed: int) -> str:
    return f"{experiment}-{dataset}{'-tiny' if tiny else ''}-{regime}-{method}-seed{seed}"


def run_black_box(method: str, problem: Problem, programs: Programs, seed: int, budget: float,
                  storage, name: str) -> Run:
    """Random search or TPE as an Optuna study; resumes from ``storage`` under ``name``.

    Sampling runs on an in-memory copy of the study (the persistent one
    receives every finished trial, with its ``elapsed`` seconds): Optuna's
    database storages write each suggested parameter in a transaction of
    its own, which for 800 parameters costs seconds per trial and would
    measure the storage, not the sampler.
    """
    optuna = _optuna()
    from optuna.trial import TrialState, create_trial

    persistent = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="minimize")
    done = persistent.get_trials(deepcopy=False)
    # A fresh sampler seed per resumption, so a resumed random search does not redraw its first points.
    sampler_seed = int(np.random.SeedSequence([seed, len(done)]).generate_state(1)[0])
    if method == "tpe":
        sampler = optuna.samplers.TPESampler(seed=sampler_seed)
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
                  if programs.chunks > 1 else optuna.pruners.NopPruner())
    else:
        sampler, pruner = optuna.samplers.RandomSampler(seed=sampler_seed), optuna.pruners.NopPruner()
    study = optuna.create_study(sampler=sampler, pruner=pruner, direction="minimize")
    study.add_trials(done)
    offset = max((t.user_attrs.get("elapsed", 0.0) for t in done), default=0.0)
    dyn = problem.dynamics(seed)
    clock = Clock(offset)
    new = 0
    while clock() < budget:
        trial = study.ask()
        lam = suggest(trial, problem.space)
        if method == "tpe":
            def report(value, i, trial=trial):
                trial.report(value, i)
                return trial.should_prune()

            value = programs.evaluate_chunked(dyn, lam, report)
        else:
            value = programs.evaluate(dyn, lam)
        elapsed = clock()
        trial.set_user_attr("elapsed", elapsed)
        if value is None:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        elif not np.isfinite(value):
            frozen = study.tell(trial, state=TrialState.FAIL)
        else:
            frozen = study.tell(trial, value)
        new += 1
        with Paused(clock):
            persistent.add_trial(create_trial(
                state=frozen.state, value=frozen.value, params=frozen.params,
                distributions=frozen.distributions, user_attrs=frozen.user_attrs,
                intermediate_values=frozen.intermediate_values,
            ))
    return black_box_run(method, problem, seed, budget, study.get_trials(deepcopy=False),
                         note=f"{len(done)} trials from storage, {new} new")


def black_box_run(method, problem, seed, budget, trials, note="") -> Run:
    """The trace and choice of a study, from its trials' ``elapsed`` seconds."""
    from optuna.trial import TrialState

    tracker = Tracker(budget)
    for t in sorted(trials, key=lambda t: t.user_attrs.get("elapsed", 0.0)):
        elapsed = t.user_attrs.get("elapsed", 0.0)
        if t.state == TrialState.COMPLETE:
            tracker.add(elapsed, t.value, lam_from_params(problem.space, t.params))
        elif elapsed <= budget:
            tracker.evaluations += 1
    pruned = sum(t.state == TrialState.PRUNED and t.user_attrs.get("elapsed", 0) <= budget for t in trials)
    if pruned:
        note += f", {pruned} pruned"
    return Run(method, problem.regime, seed, tracker.trace, tracker.choice, tracker.evaluations, note)


def run_hypergradient(problem: Problem, programs: Programs, seed: int, budget: float) -> Run:
    """``hg.optimize`` (Reverse-HG, Adam on λ, projected onto the box) until the budget is spent.

    Every hyper-step computes f(λ_k) exactly (the same objective the
    black-box methods see) along with ∇f(λ_k). If training diverges, the
    run continues from the last good λ with half the hyper learning rate.
    """
    import hypergradient as hg

    dyn = problem.dynamics(seed)
    tracker = Tracker(budget)
    lam, lr, notes = lam_centre(problem.space), problem.hyper_lr, []
    clock = Clock()

    def callback(step, hparams, value, grad):
        tracker.add(clock(), value, hparams)
        return clock() >= budget

    while clock() < budget:
        try:
            hg.optimize(dyn, problem.objective, lam, method=hg.Reverse(), hyper_optimizer=programs.adam(lr),
                        hyper_steps=10**9, constraint=programs.box, callback=callback,
                        progress=False)
            break
        except hg.HyperDivergenceError as e:
            lam, lr = e.hparams, lr / 2
            notes.append(f"diverged at hyper-step {e.hyper_step}: hyper lr halved to {lr:g}")
    return Run("hypergradient", problem.regime, seed, tracker.trace, tracker.choice, tracker.evaluations,
               "; ".join(notes))


def _online_loop_seconds(history_seconds: np.ndarray) -> float:
    """The time of ``hg.online``'s compiled loop without its compilation.

    With ``chunk=1`` every chunk runs the same program; in the pass that
    compiles it the first chunk includes the compile, so the first chunk of
    every pass is counted as the median of the others.
    """
    s = np.asarray(history_seconds, np.float64)
    if len(s) > 1:
        s = s.copy()
        s[0] = np.median(s[1:])
    return float(s.sum())


def run_online(problem: Problem, programs: Programs, seed: int, budget: float) -> Run:
    """Repeated ``hg.online`` passes (RTHO or TRHO), each warm-started at the λ the last one ended with.

    After each pass λ is scored by f(λ) (a fresh training run, counted), the
    number the other methods are compared on. The clock counts the
    compiled loop and that evaluation, not ``hg.online``'s compilation (in
    the first pass, and again after the hyper learning rate is halved; the
    other passes reuse the compiled loop). The passes also stop when the
    *wall* clock, compiles included, reaches the budget. Adam's state
    restarts at each pass.
    """
    import hypergradient as hg

    dyn = problem.dynamics(seed)
    tracker = Tracker(budget)
    lam, lr, notes = lam_centre(problem.space), problem.hyper_lr, []
    spent, passes = 0.0, 0
    wall = Clock()  # compiles are not in `spent`; this bounds the wall time they add
    while spent < budget and wall() < budget:
        try:
            res = hg.online(dyn, problem.objective, lam, method=problem.online_method, every=problem.online_every,
                            hyper_optimizer=programs.adam(lr), constraint=programs.box, chunk=1,
                            progress=False)
            spent += _online_loop_seconds(res.history["seconds"])
            lam = res.hparams
        except hg.HyperDivergenceError as e:
            spent += _online_loop_seconds(e.history["seconds"])
            lam, lr = e.hparams, lr / 2
            notes.append(f"pass {passes} diverged: hyper lr halved to {lr:g}")
        t0 = time.perf_counter()
        value = programs.evaluate(dyn, lam)
        spent += time.perf_counter() - t0
        passes += 1
        tracker.add(spent, value, lam)
    name = "RTHO, Forward" if isinstance(problem.online_method, hg.Forward) else f"TRHO, {problem.online_method!r}"
    notes.insert(0, f"{passes} passes ({name}, every {problem.online_every} steps)")
    return Run("online", problem.regime, seed, tracker.trace, tracker.choice, tracker.evaluations, "; ".join(notes))


# -- the comparison --------------------------------------------------------------------------------

def _record_path(out: Path, run_key: dict) -> Path:
    return out / "runs" / f"{run_key['regime']}-{run_key['method']}-seed{run_key['seed']}.json"


def _load_record(out: Path, run_key: dict) -> Run | None:
    path = _record_path(out, run_key)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("key") != run_key:
        return None
    choice = None if rec["choice"] is None else {k: np.asarray(v, np.float32) for k, v in rec["choice"].items()}
    return Run(rec["method"], rec["regime"], rec["seed"], [tuple(p) for p in rec["trace"]], choice,
               rec["evaluations"], rec["note"])


def _save_record(out: Path, run_key: dict, run: Run) -> None:
    path = _record_path(out, run_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"key": run_key, "method": run.method, "regime": run.regime, "seed": run.seed, "trace": run.trace,
           "choice": None if run.choice is None else {k: v.tolist() for k, v in run.choice.items()},
           "evaluations": run.evaluations, "note": run.note}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)


def compare(experiment: str, dataset: str = "digits", data_dir: str | None = None, *, budget: float = 60.0,
            seeds: int = 1, regimes: Sequence[str] = REGIMES, methods: Sequence[str] = METHODS,
            tiny: bool = False, out: str | os.PathLike = "results/compare", storage: str | None = None) -> dict:
    """Run the comparison and write its files; returns ``{"runs": [...], "summary": [...], ...}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage_spec = storage or str(out / "optuna.journal")
    store = open_storage(storage_spec) if {"random", "tpe"} & set(methods) else None
    problems = _problems(experiment, dataset, data_dir, tiny)
    runs: list[Run] = []
    compile_seconds = {}
    for regime in regimes:
        problem = problems[regime]
        programs = _programs(problem)
        say(f"[{regime}] {space_size(problem.space)} hyperparameters; {problem.description}")
        compile_seconds[regime] = programs.warm_up(methods)
        say(f"[{regime}] compiled in {compile_seconds[regime]:.1f} s (not counted in any budget)")
        for seed in range(seeds):
            for method in methods:
                run_key = {"experiment": experiment, "dataset": dataset, "tiny": tiny, "regime": regime,
                           "method": method, "seed": seed, "budget": budget}
                started = time.perf_counter()
                if method in ("random", "tpe"):
                    name = study_name(experiment, dataset, tiny, regime, method, seed)
                    run = run_black_box(method, problem, programs, seed, budget, store, name)
                else:
                    run = _load_record(out, run_key)
                    if run is not None:
                        run.note = (run.note + "; " if run.note else "") + "read back from runs/"
                    else:
                        fn = run_hypergradient if method == "hypergradient" else run_online
                        run = fn(problem, programs, seed, budget)
                        _save_record(out, run_key, run)
                _evaluate_choice(problem, programs, run)
                runs.append(run)
                say(f"[{regime}] seed {seed} {method:<13} best val {run.best_val:.4f}  test error "
                    f"{run.test_error:.4f}  ({run.evaluations} evaluations, {time.perf_counter() - started:.0f} s "
                    f"wall){'  ' + run.note if run.note else ''}")
    summary = summarize(runs, {r: space_size(problems[r].space) for r in regimes})
    write_outputs(out, runs, summary, budget, experiment, dataset, compile_seconds, storage_spec)
    return {"runs": runs, "summary": summary, "compile_seconds": compile_seconds, "storage": storage_spec}


@functools.lru_cache(maxsize=4)
def _problems(experiment: str, dataset: str, data_dir: str | None, tiny: bool) -> dict[str, Problem]:
    """Both regimes of an experiment, built once per process (a second comparison reuses their compiled programs)."""
    return EXPERIMENTS[experiment](dataset, data_dir, tiny, REGIMES)


def _programs(problem: Problem) -> Programs:
    if getattr(problem, "_programs", None) is None:
        problem._programs = Programs(problem)
    return problem._programs


def _evaluate_choice(problem: Problem, programs: Programs, run: Run) -> None:
    """Retrain at the method's final choice (same seed) and score it on validation and test."""
    import jax.numpy as jnp

    import hypergradient as hg

    if run.choice is None:
        return
    dyn = problem.dynamics(run.seed)
    lam = {k: jnp.asarray(v, jnp.float32) for k, v in run.choice.items()}
    try:
        w = dyn.run(lam)
    except hg.DivergenceError:
        return
    run.val_loss = float(programs.val(w, lam))
    loss, error = problem.test(w)
    run.test_loss, run.test_error = float(loss), float(error)


# -- outputs ------------------------------------------------------------------------------------------

def _mean_std(xs) -> tuple[float, float]:
    xs = np.asarray([x for x in xs if np.isfinite(x)], np.float64)
    if not len(xs):
        return float("nan"), float("nan")
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def summarize(runs: Sequence[Run], sizes: Mapping[str, int]) -> list[dict]:
    rows = []
    for regime in dict.fromkeys(r.regime for r in runs):
        for method in dict.fromkeys(r.method for r in runs if r.regime == regime):
            group = [r for r in runs if r.regime == regime and r.method == method]
            val, val_sd = _mean_std([r.best_val for r in group])
            err, err_sd = _mean_std([r.test_error for r in group])
            tl, tl_sd = _mean_std([r.test_loss for r in group])
            rows.append({
                "regime": regime, "hyperparameters": sizes[regime], "method": method, "seeds": len(group),
                "best_val_loss": val, "best_val_loss_std": val_sd, "test_error": err, "test_error_std": err_sd,
                "test_loss": tl, "test_loss_std": tl_sd,
                "evaluations": float(np.mean([r.evaluations for r in group])),
            })
    return rows


def summary_markdown(rows: Sequence[dict], budget: float) -> str:
    lines = [
        f"Budget {budget:g} s per method, regime and seed (compilation excluded). Mean ± std over seeds.",
        "",
        "| regime | λ size | method | best val loss | test error | test loss | evaluations |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [_pm(r[k], r[k + "_std"], r["seeds"]) for k in ("best_val_loss", "test_error", "test_loss")]
        lines.append(f"| {r['regime']} | {r['hyperparameters']} | {r['method']} | {' | '.join(cells)} "
                     f"| {r['evaluations']:.0f} |")
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float, n: int) -> str:
    if not np.isfinite(mean):
        return "—"
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def write_outputs(out: Path, runs, summary, budget, experiment, dataset, compile_seconds, storage_spec) -> None:
    with open(out / "trace.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "regime", "seed", "seconds", "best_val"])
        for r in runs:
            for seconds, best in r.trace:
                w.writerow([r.method, r.regime, r.seed, f"{seconds:.4f}", f"{best:.8g}"])
    columns = list(summary[0]) if summary else []
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in summary:
            w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    md = [f"# compare {experiment} on {dataset}", "", summary_markdown(summary, budget),
          "compile seconds per regime (excluded): "
          + ", ".join(f"{k} {v:.1f}" for k, v in compile_seconds.items()), "",
          f"Optuna storage: `{storage_spec}`", ""]
    md += ["| regime | method | seed | evaluations | note |", "|---|---|---:|---:|---|"]
    md += [f"| {r.regime} | {r.method} | {r.seed} | {r.evaluations} | {r.note} |" for r in runs]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    plot_trace(out / "trace.png", runs, budget, experiment, dataset)


COLORS = {"random": "tab:gray", "tpe": "tab:orange", "hypergradient": "tab:blue", "online": "tab:green"}


def plot_trace(path: Path, runs: Sequence[Run], budget: float, experiment: str, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    regimes = list(dict.fromkeys(r.regime for r in runs))
    fig, axes = plt.subplots(1, max(1, len(regimes)), figsize=(5.2 * max(1, len(regimes)), 3.8), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        labelled, finite = set(), []
        for r in runs:
            if r.regime != regime or not r.trace:
                continue
            xs = [s for s, _ in r.trace] + [budget]
            ys = [v for _, v in r.trace] + [r.trace[-1][1]]
            finite += ys
            ax.step(xs, ys, where="post", color=COLORS.get(r.method), alpha=0.85,
                    label=None if r.method in labelled else r.method)
            labelled.add(r.method)
        if finite:  # log scale: a diverging black-box trial can be 10x worse than a good one
            ax.set_yscale("log")
        ax.set(title=f"{experiment} ({dataset}): {regime} hyperparameters", xlabel="seconds (compile excluded)",
               ylabel="best validation loss so far", xlim=(0, budget))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(rows: Sequence[dict], budget: float, out: Path) -> None:
    print(summary_markdown(rows, budget))
    print(f"wrote trace.csv, summary.csv, summary.md, trace.png to {out}")


# -- command line --------------------------------------------------------------------------------------

def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (also used by the ``hypergradient`` command)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(bad) or text!r}; choose from {', '.join(METHODS)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``compare`` command's arguments to ``parser`` (a subcommand's parser)."""
    parser.add_argument("experiment", metavar="EXPERIMENT", choices=tuple(EXPERIMENTS),
                        help="the task to tune: " + ", ".join(EXPERIMENTS))
    parser.add_argument("--budget-seconds", type=_positive_float, default=60.0, metavar="S",
                        help="wall-clock seconds per method, regime and seed, compilation excluded (default 60)")
    parser.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                        help="repetitions (weights, minibatch order, sampler seed); default 1")
    parser.add_argument("--storage", metavar="URL",
                        help="Optuna storage of the random-search and TPE studies: a URL such as "
                        "sqlite:///study.db, or a journal file path (default OUT/optuna.journal); "
                        "the same storage resumes an interrupted comparison")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default results/compare-EXPERIMENT-DATASET[-tiny])")
    parser.add_argument("--dataset", default="digits", choices=DATASETS, help="digits (default), fashion-mnist, mnist")
    parser.add_argument("--data-dir", metavar="DIR", help="folder of the IDX files (fashion-mnist, mnist)")
    parser.add_argument("--regime", default="both", choices=("few", "many", "both"),
                        help="few (lr, momentum, L2), many (per-step, per-layer schedules) or both (default)")
    parser.add_argument("--methods", type=_methods, default=METHODS, metavar="M[,M...]",
                        help="a subset of " + ",".join(METHODS) + " (default: all)")
    parser.add_argument("--tiny", action="store_true", help="the experiment's tiny configuration (a smoke test)")


def main(args: argparse.Namespace) -> int:
    """Run ``hypergradient compare`` with parsed ``args``; print the summary; return the exit code."""
    regimes = REGIMES if args.regime == "both" else (args.regime,)
    out = Path(args.out) if args.out else Path("results") / (
        f"compare-{args.experiment}-{args.dataset}" + ("-tiny" if args.tiny else ""))
    try:
        from hypergradient.apps import datasets

        datasets.load(args.dataset, args.data_dir, n_train=1, n_val=1, n_test=1)
    except (FileNotFoundError, ValueError) as e:
        print(f"hypergradient compare: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    say(f"hypergradient compare {args.experiment}: dataset {args.dataset}{' (tiny)' if args.tiny else ''}, "
        f"{args.budget_seconds:g} s per method, regime and seed, {args.seeds} seed(s) -> {out}")
    try:
        result = compare(args.experiment, args.dataset, args.data_dir, budget=args.budget_seconds, seeds=args.seeds,
                         regimes=regimes, methods=args.methods, tiny=args.tiny, out=out, storage=args.storage)
    except KeyboardInterrupt:
        say(f"\ninterrupted. Run the same command again to resume (studies in the Optuna storage, "
            f"finished runs in {out / 'runs'}).")
        return EXIT_INTERRUPTED
    print_summary(result["summary"], args.budget_seconds, out)
    return EXIT_OK


def _standalone(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hypergradient compare", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_standalone())
