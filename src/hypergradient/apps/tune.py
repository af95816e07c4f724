"""Trials on a Ray cluster: many hypergradient tuning runs, their outer settings searched by Ray Tune.

Hypergradient descent tunes λ inside one run; what stays outside it (the hyper learning rate, the
seed, discrete choices) is searched over many runs by Ray Tune, which schedules, retries and
checkpoints them on one machine or a cluster::

    from ray import tune as rt
    from hypergradient.apps import tune

    def build(config):                     # -> (dyn, objective, lam0) or (dyn, objective, lam0, constraint)
        ...
    space = {"hyper_lr": rt.loguniform(1e-3, 1e-1), "hyper_steps": 50}
    trials = tune.run(build, space, trials=16, address="local", search="optuna", out="results/tune")

Each trial is one ``hg.optimize`` with Adam at ``config["hyper_lr"]`` for ``config["hyper_steps"]``
hyper-steps. After every hyper-step it reports ``objective`` (f(λ_k)) and ``best_objective`` (the
lowest so far, the metric Tune minimizes) to Tune, with a Tune checkpoint holding the driver's own
checkpoint whenever the driver has written a new one; a trial restarted after its worker died
copies it back and the driver resumes from it.

``out`` receives ``trials.csv`` (one row per trial), ``trials.png`` (every trial's curve), ``best/``
(the best trial's ``result.json`` and its driver checkpoint), ``trials-settings.json`` (what defines
the trials) and ``ray/`` (Tune's own records). ``out`` is held while the trials run, as a single run
holds its folder. Called again with the same settings, :func:`run` restores Tune's experiment in
``out/ray`` (``Tuner.restore``): finished trials are kept, unfinished ones go on from their
checkpoints. Interrupted (Ctrl-C), it writes the trials that finished and raises
:class:`Interrupted`. Needs the extra ``ray`` (``pip install 'hypergradient[ray]'``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import optax

import hypergradient as hg
from hypergradient.errors import ExperimentError

from . import experiments, methods
from .experiments import folder, plots, runner
from .terminal import missing_extra, say

METRIC = "best_objective"
SEARCHES = ("random", "optuna")
SCHEDULERS = ("asha",)
EXPERIMENT = "ray"  # Tune's experiment folder under out
FINISHED = "finished"  # in a trial's last report: it ran all its hyper-steps
SETTINGS_FILE = "trials-settings.json"
CONNECT_SECONDS = 30  # how long a cluster's address may take to answer


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the trials; ``trials.csv`` holds those that finished, and the same call resumes.

    Attributes:
      finished: how many trials had finished (the rows of ``trials.csv``).
      trials: how many trials Tune knew of.
    """

    def __init__(self, message: str, finished: int, trials: int):
        super().__init__(message)
        self.finished, self.trials = finished, trials


@dataclasses.dataclass(frozen=True)
class Trials:
    """What :func:`run` found.

    Attributes:
      rows: one per trial (trials.csv): its settings, ``best_objective``, ``hyper_steps_run``,
        ``final_objective`` and ``status`` (``done``, ``stopped`` by the scheduler, or ``error``).
      best: the row of the lowest ``best_objective``.
      curves: trial id -> f(λ_k) for k = 0, 1, ... (what trials.png draws).
    """

    rows: list[dict]
    best: dict
    curves: dict[str, list[float]]


def run(build: Callable[[Mapping[str, Any]], tuple], search_space: Mapping[str, Any], trials: int = 8, *,
        address: str | None = None, search: str = "random", scheduler: str | None = None,
        cpus_per_trial: float = 1, gpus_per_trial: float = 0, method: hg.Method | None = None,
        out: str | Path = "tune-results", max_failures: int = 3, mlflow: str | None = None,
        num_cpus: int | None = None) -> Trials:
    """Run ``trials`` tuning runs whose outer settings Tune draws from ``search_space``.

    Args:
      build: ``config -> (dyn, objective, lam0)`` or ``(..., constraint)``: the problem of one trial.
        It runs on a Ray worker, so it must be importable there (a module-level function).
      search_space: Tune's ``param_space``; ``hyper_lr`` and ``hyper_steps`` set Adam's learning
        rate and the number of hyper-steps of each trial, the other keys are ``build``'s.
      trials: Tune's ``num_samples``.
      address: ``None`` (Ray's default: ``RAY_ADDRESS`` or a new local instance), ``"local"`` (a new
        local instance) or a cluster's address (``"HOST:PORT"``, ``"ray://HOST:10001"``). Ignored
        when Ray is already initialized in this process.
      search: ``"random"`` (Tune's sampling) or ``"optuna"`` (Optuna's TPE through ``OptunaSearch``).
      scheduler: ``None`` or ``"asha"`` (stops poor trials early, on ``best_objective``).
      cpus_per_trial, gpus_per_trial: the resources each trial holds.
      method: how each trial takes the hypergradient (default ``hg.Reverse()``).
      out: the results folder.
      max_failures: how many times a failed trial (a worker that died) is restarted from its checkpoint.
      mlflow: a tracking URI: log every trial's settings, metrics and files to MLflow (``""``: a
        local store, ``out/mlflow.db`` and ``out/mlartifacts``).
      num_cpus: the CPUs of a new local instance (default: all of this machine's).

    Raises:
      ExperimentError: ``out`` is held by another run; a resource per trial is negative, or more
        than any node of the cluster has.
      ConnectionError: nothing answers at ``address`` within 30 s.
      Interrupted: Ctrl-C; ``trials.csv`` holds the trials that finished, and the same call resumes.
    """
    _check_options(search, scheduler, cpus_per_trial, gpus_per_trial)
    out = Path(out).resolve()
    with folder.claim(out):
        return _tune(build, search_space, trials, address=address, search=search, scheduler=scheduler,
                     cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, method=method, out=out,
                     max_failures=max_failures, mlflow=mlflow, num_cpus=num_cpus)


def _check_options(search: str, scheduler: str | None, cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Refuse what would never run (a negative resource makes Ray wait for ever), before anything starts."""
    if search not in SEARCHES or scheduler not in (None, *SCHEDULERS):
        raise ExperimentError(f"search must be one of {SEARCHES} and scheduler None or one of {SCHEDULERS}; "
                              f"got {search!r}, {scheduler!r}")
    for name, value in (("cpus", cpus_per_trial), ("gpus", gpus_per_trial)):
        if not (math.isfinite(value) and value >= 0):
            raise ExperimentError(f"{name} per trial must be a number >= 0, got {value:g}")


def _tune(build: Callable, search_space: Mapping[str, Any], trials: int, *, address, search, scheduler,
          cpus_per_trial, gpus_per_trial, method, out: Path, max_failures, mlflow, num_cpus) -> Trials:
    """:func:`run` in ``out``, which the caller holds."""
    ray, tune = _ray(mlflow is not None)
    experiment = out / EXPERIMENT
    _prepare(out, {"build": _describe(build), "search_space": _describe(dict(search_space)), "trials": trials,
                   "search": search, "scheduler": scheduler, "method": _describe(method)})
    started = not ray.is_initialized()
    if started:
        local = address in (None, "local") and not (address is None and os.environ.get("RAY_ADDRESS"))
        if not local:
            _check_answers(address or os.environ["RAY_ADDRESS"])
        ray.init(address=address, num_cpus=num_cpus if local else None, logging_level=logging.WARNING)
    try:
        _check_resources(ray, cpus_per_trial, gpus_per_trial)
        trainable = tune.with_resources(functools.partial(_trial, build=build, method=method),
                                        {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        if tune.Tuner.can_restore(experiment):
            say(f"resuming the trials in {experiment}: finished trials are kept")
            tuner = tune.Tuner.restore(str(experiment), trainable)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=dict(search_space),
                tune_config=tune.TuneConfig(metric=METRIC, mode="min", num_samples=trials,
                                            search_alg=_searcher(search), scheduler=_scheduler(scheduler)),
                run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out),
                                          failure_config=tune.FailureConfig(max_failures=max_failures),
                                          callbacks=_mlflow(mlflow, out), verbose=0),
            )
        return _write(tuner.fit(), out)
    finally:
        if started:
            ray.shutdown()


def _prepare(out: Path, settings: dict) -> None:
    """Write ``out/trials-settings.json``; Tune's experiment and the tables of other settings go first.

    Tune restores an experiment with the settings it was started with, whatever the new call asks:
    trials of other settings are started afresh instead of resumed.
    """
    settings = json.loads(json.dumps(folder.jsonable(settings)))
    path = out / SETTINGS_FILE
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        before = None
    if before != settings:
        if (out / EXPERIMENT).exists():
            say(f"the trial settings differ from those in {out}: starting the trials afresh")
            shutil.rmtree(out / EXPERIMENT)
        for name in ("trials.csv", "trials.png"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "best", ignore_errors=True)
    folder.write_json(path, settings)


def _describe(x: Any) -> Any:
    """``x`` as plain values that stay the same from one process to the next (no ids or addresses):
    what :func:`_prepare` compares. A function is its qualified name, an object its class and fields."""
    if isinstance(x, functools.partial):
        return {"partial": _describe(x.func), "args": _describe(x.args), "keywords": _describe(x.keywords)}
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    if isinstance(x, Mapping):
        return {str(k): _describe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_describe(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if callable(x) and hasattr(x, "__qualname__"):
        return f"{getattr(x, '__module__', '')}.{x.__qualname__}"
    if dataclasses.is_dataclass(x):
        return {type(x).__qualname__: _describe({f.name: getattr(x, f.name) for f in dataclasses.fields(x)})}
    if hasattr(x, "__dict__"):
        return {type(x).__qualname__: _describe(vars(x))}
    return repr(x)


def _check_answers(address: str) -> None:
    """Raise ``ConnectionError`` unless something listens at a cluster's ``HOST:PORT`` (``ray.init``
    would wait for it for ever)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except ValueError:
        raise ConnectionError(f"the Ray address {address!r} is not HOST:PORT") from None
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else e.strerror or str(e)
        raise ConnectionError(f"no Ray cluster at {address} ({why} within {CONNECT_SECONDS} s); "
                              f"start one with `ray start --head` or give another address") from None


def _check_resources(ray, cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Refuse a trial that no node of the cluster can hold (Tune would keep it pending for ever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    for name, need in (("CPU", cpus_per_trial), ("GPU", gpus_per_trial)):
        most = max((n.get(name, 0) for n in nodes), default=0)
        if need > most:
            raise ExperimentError(
                f"each trial asks for {need:g} {name}(s), but no node of the Ray cluster has more than {most:g} "
                f"(the cluster: {len(nodes)} node(s), {total['CPU']:g} CPUs, {total['GPU']:g} GPUs)")


def _ray(with_mlflow: bool):
    """``ray`` and ``ray.tune``, or an ImportError naming the extra that brings them."""
    for module in ("ray.tune", *(("mlflow",) if with_mlflow else ())):
        if install := missing_extra(module.split(".")[0], "ray"):
            raise ImportError(f"trials on Ray need {module}: {install}")
    import ray
    from ray import tune

    return ray, tune


def _searcher(search: str):
    if search == "random":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch()


def _scheduler(name: str | None):
    if name is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t: the trial's own hyper_steps end it, never the scheduler
    return ASHAScheduler(time_attr="training_iteration", grace_period=2, max_t=2**31)


def _mlflow(uri: str | None, out: Path) -> list:
    """Tune's MLflow logger; by default into ``out/mlflow.db`` (SQLite), files in ``out/mlartifacts``."""
    if uri is None:
        return []
    import mlflow
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    if not uri:  # MLflow 3 refuses a plain-file store; its artifacts would otherwise land in the cwd
        uri = f"sqlite:///{out / 'mlflow.db'}"
        client = mlflow.MlflowClient(uri)
        if client.get_experiment_by_name(out.name) is None:
            client.create_experiment(out.name, artifact_location=(out / "mlartifacts").as_uri())
    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=out.name, save_artifact=True)]


# -- one trial, on a Ray worker ------------------------------------------------------------------

def _trial(config: Mapping[str, Any], *, build: Callable, method: hg.Method | None) -> None:
    """One ``hg.optimize`` run, reporting to Tune after every hyper-step and resuming from Tune's checkpoint."""
    from ray import tune

    dyn, objective, lam0, *constraint = build(config)
    with tempfile.TemporaryDirectory(prefix="hypergradient-trial-") as work:
        work = Path(work)
        if restored := tune.get_checkpoint():
            restored.to_directory(str(work))
        seen = {"best": math.inf, "written": _written(work)}

        def report(step, hparams, value, grad):
            seen["best"] = min(seen["best"], _finite(value))
            tune.report({"hyper_step": int(step), "objective": float(value), METRIC: seen["best"]},
                        checkpoint=_new_checkpoint(tune, work, seen))

        try:
            res = hg.optimize(dyn, objective, lam0, method=method, hyper_optimizer=optax.adam(config["hyper_lr"]),
                              hyper_steps=config["hyper_steps"], constraint=constraint[0] if constraint else None,
                              callback=report, checkpoint_dir=work, progress=False)
            final = {"hyper_steps": res.steps, "objective": float(res.value), METRIC: _finite(res.best_value)}
        except hg.HyperDivergenceError as e:
            final = {"hyper_steps": int(e.hyper_step), "objective": math.inf, METRIC: seen["best"]}
        # "finished", not Tune's own "done", which Tune also sets on a trial its scheduler stops
        tune.report({**final, FINISHED: True}, checkpoint=tune.Checkpoint.from_directory(str(work)))


def _finite(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else math.inf


def _written(work: Path) -> int | None:
    """The step of the newest driver checkpoint under ``work`` (orbax names step folders by number)."""
    steps = [int(p.name) for p in (work / "optimize").glob("*") if p.name.isdigit()]
    return max(steps, default=None)


def _new_checkpoint(tune, work: Path, seen: dict):
    """A Tune checkpoint of ``work`` if the driver has written a checkpoint since the last one reported."""
    written = _written(work)
    if written is None or written == seen["written"]:
        return None
    seen["written"] = written
    return tune.Checkpoint.from_directory(str(work))


# -- the results folder --------------------------------------------------------------------------

def _write(results, out: Path) -> Trials:
    """trials.csv, trials.png and best/ from Tune's ``ResultGrid``, of the trials that finished.

    A trial Tune left unfinished (Ctrl-C stops Tune's loop and ``fit`` returns) is left out, and
    :class:`Interrupted` raised once the files are written.
    """
    rows, curves, checkpoints, unfinished = [], {}, {}, 0
    for result in results:
        metrics = result.metrics or {}
        status = ("error" if result.error else "done" if metrics.get(FINISHED)
                  else "stopped" if metrics.get("done") else None)  # Tune marks done a trial its scheduler stops
        if status is None:
            unfinished += 1
            continue
        trial = metrics.get("trial_id", result.path)
        rows.append({"trial": trial,
                     **{k: v for k, v in (result.config or {}).items() if isinstance(v, (int, float, str, bool))},
                     "best_objective": metrics.get(METRIC, math.inf),
                     "hyper_steps_run": metrics["hyper_steps"] if status == "done" else metrics.get("hyper_step", -1) + 1,
                     "final_objective": metrics.get("objective", math.inf),
                     "status": status})
        curves[trial] = _curve(result.metrics_dataframe)
        checkpoints[trial] = result.checkpoint
    if rows:
        best = min(rows, key=lambda r: r["best_objective"])
        folder.write_csv(out / "trials.csv", {k: [r.get(k, "") for r in rows] for k in rows[0]})
        _plot(curves, best["trial"], out / "trials.png")
        _write_best(best, curves[best["trial"]], checkpoints[best["trial"]], out / "best")
    if unfinished:
        total = len(rows) + unfinished
        where = f" (in {out / 'trials.csv'})" if rows else ""
        raise Interrupted(f"{len(rows)} of {total} trials finished{where}", len(rows), total)
    if not rows:
        raise RuntimeError("Tune ran no trial")
    return Trials(rows, best, curves)


def _curve(frame) -> list[float]:
    """f(λ_k) by hyper-step from a trial's reports (a resumed trial reports some steps twice: the last counts)."""
    if frame is None or "hyper_step" not in frame:
        return []
    steps = frame.dropna(subset=["hyper_step"]).drop_duplicates("hyper_step", keep="last").sort_values("hyper_step")
    return [float(v) for v in steps["objective"]]


def _plot(curves: Mapping[str, list[float]], best: str, path: Path) -> None:
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for trial, curve in curves.items():
        ax.plot(curve, lw=2 if trial == best else 0.8, alpha=1 if trial == best else 0.6,
                label=f"best trial {trial}" if trial == best else None)
    if all(v > 0 for c in curves.values() for v in c if np.isfinite(v)):
        ax.set_yscale("log")
    ax.set(xlabel="hyper-step", ylabel="objective f(λ_k)", title=f"{len(curves)} trials")
    ax.legend()
    plots.savefig(fig, path)


def _write_best(best: dict, curve: list[float], checkpoint, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    if checkpoint is not None:
        checkpoint.to_directory(str(out / "checkpoint"))
    folder.write_json(out / "result.json", {**best, "curve": curve})


# -- the experiments as trials (`hypergradient run EXPERIMENT --trials N`) -----------------------

def run_experiment(name: str, config, trials: int, out: str | Path, **options) -> tuple[Trials, dict]:
    """Trials of experiment ``name`` at ``config``, its hyper learning rate and seed searched by Tune.

    Each trial tunes the experiment's first search (``Experiment.searches``) with ``config.method``;
    ``best/`` then holds the experiment run in full at the best trial's settings (its result.json,
    history.csv and plots). ``options`` go to :func:`run`. Returns the trials and best/'s result.
    """
    module, config = experiments.get(name), config.resolved()
    if methods.METHODS[config.method].realtime:
        raise ExperimentError(f"--trials runs offline methods (hg.optimize); {config.method!r} is real-time")
    from ray import tune

    # realtime's offline comparator has hyper-steps of its own; hyper_steps sizes its training run
    hyper_steps = getattr(config, "offline_hyper_steps", None) or config.hyper_steps
    space = {"hyper_lr": tune.loguniform(config.hyper_lr / 10, config.hyper_lr * 10),
             "seed": tune.randint(0, 2**16), "hyper_steps": hyper_steps}
    call = inspect.signature(run).bind(functools.partial(build_experiment, name=name, config=config), space, trials,
                                       method=methods.make(config.method, config.truncation), out=out, **options)
    call.apply_defaults()
    args = call.arguments
    _check_options(args["search"], args["scheduler"], args["cpus_per_trial"], args["gpus_per_trial"])
    out = args["out"] = Path(out).resolve()
    with folder.claim(out):  # the trials and best/ after them, as one run
        found = _tune(**args)
        best = dataclasses.replace(config, hyper_lr=found.best["hyper_lr"], seed=found.best["seed"])
        result = module.run(best, out / "best", progress=False)
        _name_trial(out / "best", found.best["trial"])
        return found, result


def _name_trial(best: Path, trial: str) -> None:
    """best/ after its full run: the result names the trial it reran, and the trial's Tune
    checkpoint gives way to the run's own checkpoints."""
    shutil.rmtree(best / "checkpoint", ignore_errors=True)
    path = best / "result.json"
    folder.write_json(path, {**json.loads(path.read_text()), "trial": trial})


def build_experiment(trial: Mapping[str, Any], *, name: str, config) -> tuple:
    """The problem of experiment ``name``'s first search at ``config`` with the trial's hyper_lr and seed."""
    module = experiments.get(name)
    config = dataclasses.replace(config, hyper_lr=trial["hyper_lr"], seed=trial["seed"])
    experiment = runner.experiment_class(module)
    exp = experiment(config, runner.load_data(experiment, config.resolved()))
    search = exp.searches(exp.baseline())[0]
    return exp.dynamics, exp.objective, search.lam0, search.constraint
