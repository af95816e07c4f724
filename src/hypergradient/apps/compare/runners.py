"""The ways of tuning λ within a budget: random search, TPE, hypergradient descent (the exact
hypergradient, or its evolution-strategy estimate), real time (exact, or PES), and TPE over the
outer settings of hypergradient descent (hybrid)."""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

import hypergradient as hg

from .clock import Clock, Paused, Run, Tracker
from .problem import Problem
from .programs import HYBRID_DOUBLINGS
from .space import lam_centre, lam_from_params, suggest, suggest_start

METHODS = ("random", "tpe", "hypergradient", "es", "online", "pes", "hybrid")
STUDIES = ("random", "tpe", "hybrid")  # the methods that run as Optuna studies in the storage
HYBRID_HYPER_STEPS = 10  # hyper-steps of hg.optimize per hybrid trial


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


def run_black_box(method: str, problem: Problem, seed: int, budget: float, storage, name: str) -> Run:
    """Random search or TPE as an Optuna study; resumes from ``storage`` under ``name``.

    Sampling runs on an in-memory copy of the study (the persistent one
    receives every finished trial, with its ``elapsed`` seconds): Optuna's
    database storages write each suggested parameter in a transaction of
    its own, which for 800 parameters costs seconds per trial and would
    measure the storage, not the sampler.
    """
    optuna = _optuna()
    from optuna.trial import TrialState

    programs = problem.programs
    if method == "tpe":
        sampler = optuna.samplers.TPESampler
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
                  if programs.chunks > 1 else optuna.pruners.NopPruner())
    else:
        sampler, pruner = optuna.samplers.RandomSampler, optuna.pruners.NopPruner()
    persistent, study, done, clock = _resume(storage, name, seed, sampler, pruner)
    dyn = problem.dynamics(seed)
    new, elapsed = 0, clock()
    while elapsed < budget:  # stop on the recorded time, so a resumed study starts where this one stopped
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
            _persist(persistent, frozen)
    return black_box_run(method, problem, seed, budget, study.get_trials(deepcopy=False),
                         note=f"{len(done)} trials from storage, {new} new")


def _resume(storage, name: str, seed: int, sampler, pruner=None):
    """The persistent study ``name`` (created if new), the in-memory study that samples (by
    ``sampler(seed=...)``, its history the persistent one's trials), those trials, and the clock,
    which starts at the latest ``elapsed`` recorded."""
    optuna = _optuna()
    persistent = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="minimize")
    done = persistent.get_trials(deepcopy=False)
    # A fresh sampler seed per resumption, so a resumed random search does not redraw its first points.
    sampler_seed = int(np.random.SeedSequence([seed, len(done)]).generate_state(1)[0])
    study = optuna.create_study(sampler=sampler(seed=sampler_seed), pruner=pruner, direction="minimize")
    study.add_trials(done)
    return persistent, study, done, Clock(max((t.user_attrs.get("elapsed", 0.0) for t in done), default=0.0))


def _persist(persistent, frozen) -> None:
    """Copy a finished trial of the in-memory study to the persistent one."""
    from optuna.trial import create_trial

    persistent.add_trial(create_trial(
        state=frozen.state, value=frozen.value, params=frozen.params,
        distributions=frozen.distributions, user_attrs=frozen.user_attrs,
        intermediate_values=frozen.intermediate_values,
    ))


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
    return tracker.run(method, problem.regime, seed, note)


def run_hypergradient(problem: Problem, seed: int, budget: float, name: str = "hypergradient") -> Run:
    """``hg.optimize`` (Adam on λ, projected onto the box) until the budget is spent, with Reverse-HG
    (``name`` "hypergradient") or ``hg.ES`` ("es": the gradient of the smoothed objective from 2N
    perturbed runs per hyper-step).

    Every hyper-step computes f(λ_k) exactly (the same objective the
    black-box methods see; ES's unperturbed run) along with the gradient. If training diverges, the
    run continues from the last good λ with half the hyper learning rate.
    """
    programs = problem.programs
    method = programs.es if name == "es" else programs.reverse
    dyn = problem.dynamics(seed)
    tracker = Tracker(budget)
    lam, lr, notes = lam_centre(problem.space), problem.hyper_lr, []
    clock = Clock()

    def callback(step, hparams, value, grad):
        tracker.add(clock(), value, hparams)
        return clock() >= budget

    while clock() < budget:
        try:
            hg.optimize(dyn, problem.objective, lam, method=method, hyper_optimizer=programs.adam(lr),
                        hyper_steps=10**9, constraint=programs.box, callback=callback,
                        progress=False)
            break
        except hg.HyperDivergenceError as e:
            lam, lr = e.hparams, lr / 2
            notes.append(f"diverged at hyper-step {e.hyper_step}: hyper lr halved to {lr:g}")
    if name == "es":
        notes.insert(0, repr(method))
    return tracker.run(name, problem.regime, seed, "; ".join(notes))


def run_hybrid(problem: Problem, seed: int, budget: float, storage, name: str) -> Run:
    """TPE over the outer settings, hypergradient descent on λ inside each trial.

    The hybrid of ``hypergradient run --trials N --search optuna`` (:mod:`hypergradient.apps.tune`,
    through Ray Tune's ``OptunaSearch``), here with Optuna directly, like ``tpe``: an Optuna study
    in the same storage, resumed the same way. Each trial draws the hyper learning rate (the
    problem's times 2^k, k in ``HYBRID_DOUBLINGS``: each value's hyper-update is compiled in the
    warm-up) and where λ starts (one number per entry, ``start_LABEL``: in the ``many`` regime a
    constant schedule), then runs ``hg.optimize`` (Reverse-HG, Adam, projected onto the box) for
    ``HYBRID_HYPER_STEPS`` hyper-steps. Every f(λ_k), and f at the final λ, is one evaluation;
    the trial's value, told to TPE, is the lowest of them. A trial that diverges keeps the values
    before the divergence. The trial records its ``curve`` ((seconds, f) within the budget) and
    its ``best_lam``, from which :func:`hybrid_run` builds the run.
    """
    optuna = _optuna()
    from optuna.trial import TrialState

    programs = problem.programs
    persistent, study, done, clock = _resume(storage, name, seed, optuna.samplers.TPESampler)
    dyn = problem.dynamics(seed)
    new, elapsed = 0, clock()
    while elapsed < budget:  # as in run_black_box: the recorded time decides
        trial = study.ask()
        lr = programs.hybrid_lr(trial.suggest_int("hyper_lr_doublings", HYBRID_DOUBLINGS[0], HYBRID_DOUBLINGS[-1]))
        lam0 = suggest_start(trial, problem.space)
        curve, best = [], {"value": np.inf, "lam": None}

        def record(value, lam, curve=curve, best=best):
            seconds = clock()
            if seconds <= budget and np.isfinite(value):
                curve.append((seconds, float(value)))
                if value < best["value"]:
                    best.update(value=float(value), lam={k: np.asarray(v).tolist() for k, v in lam.items()})
            return seconds >= budget

        try:
            res = hg.optimize(dyn, problem.objective, lam0, method=programs.reverse, hyper_optimizer=programs.adam(lr),
                              hyper_steps=HYBRID_HYPER_STEPS, constraint=programs.box,
                              callback=lambda step, lam, value, grad: record(value, lam), progress=False)
            if not res.stopped:
                record(res.value, res.hparams)
            trial.set_user_attr("diverged", False)
        except hg.HyperDivergenceError:
            trial.set_user_attr("diverged", True)
        elapsed = clock()
        trial.set_user_attr("elapsed", elapsed)
        trial.set_user_attr("curve", curve)
        trial.set_user_attr("best_lam", best["lam"])
        frozen = study.tell(trial, best["value"]) if curve else study.tell(trial, state=TrialState.FAIL)
        new += 1
        with Paused(clock):
            _persist(persistent, frozen)
    return hybrid_run(problem, seed, budget, study.get_trials(deepcopy=False),
                      note=f"{len(done)} trials from storage, {new} new")


def hybrid_run(problem: Problem, seed: int, budget: float, trials, note: str = "") -> Run:
    """The trace and choice of a hybrid study, from its trials' curves.

    Each point of a trial goes to the tracker with the trial's best λ: the last improvement, whose
    λ is the run's choice, is always the best point of its trial.
    """
    from optuna.trial import TrialState

    tracker = Tracker(budget)
    points = sorted((seconds, value, t.number) for t in trials if t.state == TrialState.COMPLETE
                    for seconds, value in t.user_attrs["curve"])
    best_lam = {t.number: t.user_attrs["best_lam"] for t in trials}
    for seconds, value, number in points:
        tracker.add(seconds, value, best_lam[number])
    diverged = sum(t.user_attrs.get("diverged", False) and t.user_attrs.get("elapsed", 0) <= budget for t in trials)
    tracker.evaluations += diverged  # the hyper-step that diverged was a training run too
    note += f", {diverged} diverged" if diverged else ""
    return tracker.run("hybrid", problem.regime, seed, note + f"; {HYBRID_HYPER_STEPS} hyper-steps per trial")


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


def run_online(problem: Problem, seed: int, budget: float, name: str = "online") -> Run:
    """Repeated ``hg.online`` passes (``name`` "online": the problem's RTHO or TRHO; "pes": ``hg.PES``),
    each warm-started at the λ the last one ended with.

    After each pass λ is scored by f(λ) (a fresh training run, counted), the
    number the other methods are compared on. The clock counts the
    compiled loop and that evaluation, not ``hg.online``'s compilation (in
    the first pass, and again after the hyper learning rate is halved; the
    other passes reuse the compiled loop). The passes also stop when the
    *wall* clock, compiles included, reaches the budget. Adam's state
    restarts at each pass.
    """
    programs = problem.programs
    method = programs.pes if name == "pes" else problem.online_method
    dyn = problem.dynamics(seed)
    tracker = Tracker(budget)
    lam, lr, notes = lam_centre(problem.space), problem.hyper_lr, []
    spent, passes = 0.0, 0
    wall = Clock()  # compiles are not in `spent`; this bounds the wall time they add
    while spent < budget and wall() < budget:
        try:
            res = hg.online(dyn, problem.objective, lam, method=method, every=problem.online_every,
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
    what = ("RTHO, Forward" if problem.online == "rtho" else f"TRHO, {method!r}") if name == "online" else repr(method)
    notes.insert(0, f"{passes} passes ({what}, every {problem.online_every} steps)")
    return tracker.run(name, problem.regime, seed, "; ".join(notes))


def score_choice(problem: Problem, run: Run) -> None:
    """Retrain at the method's final choice (same seed) and score it on validation and test."""
    if run.choice is None:
        return
    dyn = problem.dynamics(run.seed)
    lam = {k: jnp.asarray(v, jnp.float32) for k, v in run.choice.items()}
    state = problem.programs.final(dyn, lam)
    if state is None:
        return
    run.val_loss = float(problem.programs.val(dyn, state, lam))
    loss, error = problem.test(state)
    run.test_loss, run.test_error = float(loss), float(error)
