"""The ``hypergradient`` command: list and run the papers' experiments.

    hypergradient list
    hypergradient run EXPERIMENT [--dataset NAME] [--data-dir DIR] [--method M]
                                 [--hyper-steps N] [--seed S] [--out DIR] [--tiny]
                                 [--trials N [--ray local|ADDRESS] [--search random|optuna]
                                  [--scheduler asha] [--gpus-per-trial G] [--mlflow [URI]]]
    hypergradient plan EXPERIMENT [--memory-budget BYTES] [--dataset NAME] [--data-dir DIR] [--tiny]
    hypergradient attribute EXPERIMENT [--dataset NAME] [--data-dir DIR] [--top K] [--out DIR] [--tiny]

run, compare and plan keep their compiled programs in JAX's persistent compilation cache
(``$XDG_CACHE_HOME/hypergradient/jax``, by default ``~/.cache/hypergradient/jax``), so a second
run of the same experiment compiles nothing; ``--no-compile-cache`` or
``HYPERGRADIENT_COMPILE_CACHE=0`` turns it off, ``HYPERGRADIENT_COMPILE_CACHE=DIR`` moves it.

``main(argv)`` returns the exit code (``terminal.EXIT_CODES``: 0 success, 1 a run that diverged,
2 a usage error: unknown experiment, dataset or method, a malformed number, an empty --out;
3 bad input: a dataset that is not on disk, not readable or too small, an --out that is a file,
read-only, full or that another run holds, a checkpoint that cannot be read; 130 interrupted),
so it can be called in-process. Every error is one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
from pathlib import Path

import hypergradient as hg
from hypergradient.errors import ExperimentError

from . import attribute, compare, experiments
from .experiments import folder
from . import methods as method_names
from .experiments.folder import FolderError
from .terminal import (EXIT_CODES, EXIT_DIVERGED, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, folder_name,
                       missing_extra, not_a_folder, os_error, positive_int, seed)

_EPILOG = """\
examples:
  hypergradient list
  hypergradient run schedules                       # digits, about a minute on 2 cores
  hypergradient run hyper-cleaning --dataset fashion-mnist
  hypergradient run realtime --method trho --hyper-steps 30
  hypergradient run distill --tiny --out /tmp/distill
  hypergradient run lm                              # a transformer LM on the standard library's text
  hypergradient run distill --tiny --trials 8 --search optuna   # 8 runs on a local Ray (extra `ray`)

Results go to results/EXPERIMENT-DATASET-METHOD (config.json, history.csv,
result.json, PNG plots). Interrupted with Ctrl-C, a run keeps its checkpoints
under OUT/checkpoints and writes the finished hyper-steps to history.csv and
interrupted.png; the same command resumes from the last hyper-step.
Compiled programs are kept in ~/.cache/hypergradient/jax (--no-compile-cache:
not kept; HYPERGRADIENT_COMPILE_CACHE=0 or =DIR in the environment).
A rerun with other settings moves the previous run to OUT/previous-<timestamp>.

""" + EXIT_CODES

#: The environment variable that turns the compilation cache off ("0") or moves it (a folder).
COMPILE_CACHE_ENV = "HYPERGRADIENT_COMPILE_CACHE"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hypergradient",
        description="Tune hyperparameters by gradient descent through the training run: "
        "reproduce the experiments of Maclaurin et al. (2015) and Franceschi et al. (2017).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("list", help="list the experiments with a one-line description each",
                   description="List the experiments with a one-line description each.")

    per_experiment = {name: experiments.get(name).METHODS for name in experiments.names()}
    used = dict.fromkeys(m for names in per_experiment.values() for m in names)
    methods = "\n".join(f"  {name:<15} {', '.join(names)}" for name, names in per_experiment.items())
    methods += "\n\nmethods:\n" + "\n".join(f"  {m:<15} {method_names.METHODS[m].help}" for m in used)
    run = sub.add_parser(
        "run",
        help="run one experiment and write its results folder",
        description="Run one experiment: print progress, write config.json, history.csv, "
        "result.json and PNG plots to the results folder, and print a summary table.",
        epilog=f"methods per experiment (the first is the default):\n{methods}\n\n" + _EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("experiment", metavar="EXPERIMENT", choices=experiments.names(),
                     help="which experiment: " + ", ".join(experiments.names()) + " (see `hypergradient list`)")
    run.add_argument("--dataset", choices=experiments.ALL_DATASETS,
                     help="digits (bundled with scikit-learn, the default), fashion-mnist (IDX files from "
                     "Debian's dataset-fashion-mnist, --data-dir or $HYPERGRADIENT_FASHION_MNIST_DIR) or "
                     "mnist (IDX files in --data-dir or $HYPERGRADIENT_MNIST_DIR); for lm, text (its only "
                     "one and default: the standard library's .py files, or the sources in --data-dir)")
    run.add_argument("--data-dir", metavar="DIR",
                     help="folder holding the four IDX files of fashion-mnist or mnist (plain or .gz); "
                     "when given, the only place read (not the environment variable or the system folder); "
                     "for text, a folder whose entries (subfolders or files) are the sources")
    run.add_argument("--method", metavar="M",
                     help="how to compute the hypergradient (default: the experiment's first method); "
                     "the methods each experiment accepts and what each does are listed below")
    run.add_argument("--hyper-steps", type=positive_int, metavar="N",
                     help="number of hyper-steps (updates of the hyperparameters; for realtime, the training "
                     "run lasts N·Δ steps); default: the experiment's paper-scale value for the dataset")
    run.add_argument("--seed", type=seed, default=0, metavar="S",
                     help="random seed of weights, minibatch order, flipped labels and drawn images "
                     "(0 to 2**32-1, default 0)")
    run.add_argument("--out", type=folder_name, metavar="DIR",
                     help="results folder (default results/EXPERIMENT-DATASET-METHOD[-tiny][-seedS]); "
                     "rerunning into the same folder with the same settings resumes from its checkpoints, "
                     "with other settings moves the previous run to DIR/previous-<timestamp>")
    run.add_argument("--tiny", action="store_true",
                     help="a tiny configuration that runs in seconds (a smoke test; its figures mean little)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bars (by default they are shown when stderr is a terminal)")
    _cache_argument(run)
    trials = run.add_argument_group("trials on Ray (extra `ray`; see docs/tune.md)")
    trials.add_argument("--trials", type=positive_int, metavar="N",
                        help="run N tuning runs under Ray Tune, each with its own hyper learning rate and seed; "
                        "write trials.csv, trials.png and best/ (the experiment at the best trial's settings)")
    trials.add_argument("--ray", metavar="local|ADDRESS", default="local",
                        help="a new local Ray instance (default) or a running cluster's address (HOST:PORT)")
    trials.add_argument("--search", choices=("random", "optuna"), default="random",
                        help="how the outer settings are drawn: at random (default) or by Optuna's TPE")
    trials.add_argument("--scheduler", choices=("asha",), help="asha: stop poor trials early")
    trials.add_argument("--gpus-per-trial", type=float, default=0, metavar="G",
                        help="GPUs each trial holds (default 0; a fraction shares one)")
    trials.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                        help="log every trial's settings, metrics and files to MLflow "
                        "(default: a local store, OUT/mlflow.db and OUT/mlartifacts)")

    compare_parser = sub.add_parser(
        "compare",
        help="random search, Optuna TPE and hypergradient descent at an equal wall-clock budget",
        description="Compare random search, Optuna's TPE and hypergradient descent (offline and real time) "
        "on one experiment, at the same wall-clock budget; write trace.csv, summary.csv/.md and trace.png.",
    )
    compare.add_arguments(compare_parser)
    _cache_argument(compare_parser)
    _cache_argument(_plan_arguments(sub))
    attribute_parser = sub.add_parser(
        "attribute", help="score every training example: which help the validation loss, which hurt it",
        description="Score every training example of an experiment's run by hg.attribute (the derivative of the "
        "validation loss in the example's weight): write scores.npy, examples.csv (the most helpful and most "
        "harmful) and examples.png (them, with their labels).")
    attribute.add_arguments(attribute_parser)
    _cache_argument(attribute_parser)
    return parser


def _cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="compile every program anew instead of reusing those compiled by earlier runs "
                        f"(kept in {_default_cache_dir()}); the same as {COMPILE_CACHE_ENV}=0 in the environment, "
                        f"where {COMPILE_CACHE_ENV}=DIR keeps them in DIR instead")


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hypergradient" / "jax"


def compile_cache_dir(disabled: bool = False) -> Path | None:
    """Where the command keeps compiled programs: ``None`` when ``disabled`` or
    ``$HYPERGRADIENT_COMPILE_CACHE`` is 0/false/off, the folder it names otherwise, else
    ``$XDG_CACHE_HOME/hypergradient/jax`` (``~/.cache/hypergradient/jax``)."""
    setting = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if disabled or setting.lower() in ("0", "false", "no", "off"):
        return None
    return Path(setting) if setting and setting.lower() not in ("1", "true", "yes", "on") else _default_cache_dir()


def use_compile_cache(directory: Path | None) -> None:
    """Keep every program compiled from now on in JAX's persistent cache under ``directory``
    (small CPU programs too: no minimum compile time or size), unless the user has set a cache of
    their own (``JAX_COMPILATION_CACHE_DIR``). JAX reads these settings at the first compile of the
    process, so a command calls this before it compiles anything."""
    import jax

    if directory is None or jax.config.jax_compilation_cache_dir is not None:
        return
    settings = {"jax_compilation_cache_dir": str(directory), "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": -1}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)  # for the processes the command starts (Ray's trials)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    if args.command == "list":
        return _list()
    use_compile_cache(compile_cache_dir(args.no_compile_cache))
    if args.command == "compare":
        return compare.main(args)
    if args.command == "plan":
        return _plan(args)
    if args.command == "attribute":
        return attribute.main(args, _error)
    return _run(parser, args)


def _list() -> int:
    rows = [(name, experiments.DESCRIPTIONS[name]) for name in experiments.names()]
    print(_table(("experiment", "what it tunes"), rows))
    print("\nrun one with: hypergradient run EXPERIMENT [--dataset fashion-mnist] (see hypergradient run --help)")
    return EXIT_OK


def _error(message: str, code: int = EXIT_USAGE) -> int:
    print(f"hypergradient: error: {one_line(message)}", file=sys.stderr)
    return code


def one_line(message: str) -> str:
    """``message`` as one line, without the JSON specs TensorStore appends to its errors."""
    message = re.sub(r"\s*\[tensorstore_spec(?:\[\d+\])?='.*?'\]", "", message, flags=re.S)
    return " ".join(message.split())


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    module = experiments.get(args.experiment)
    method = args.method or module.METHODS[0]
    if method not in module.METHODS:
        return _error(f"experiment {args.experiment!r} has no method {method!r}; "
                      f"choose one of: {', '.join(module.METHODS)}")
    if problem := experiments.choose_dataset(args, module):
        return _error(problem)
    config = module.tiny(args.dataset) if args.tiny else module.Config(dataset=args.dataset)
    changes = {"data_dir": args.data_dir, "method": method, "seed": args.seed}
    if args.hyper_steps is not None:
        changes["hyper_steps"] = args.hyper_steps
    config = dataclasses.replace(config, **changes)
    from .experiments import runner  # imported with the experiment

    try:  # fail before anything is written if the data are not there, or too few
        runner.check_data(module, config)
    except (FileNotFoundError, ValueError) as e:
        return _error(str(e), EXIT_INPUT)
    out = Path(args.out) if args.out is not None else Path("results") / _folder_name(args, method)
    if problem := not_a_folder(out):
        return _error(f"cannot write the results to {out}: {problem}", EXIT_INPUT)
    if args.trials:
        return _trials(args, config, out)

    print(f"hypergradient run {args.experiment}: dataset {args.dataset}, method {method}"
          f"{' (tiny)' if args.tiny else ''} -> {out}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        result = module.run(config, out, progress=False if args.no_progress else None)
    except KeyboardInterrupt:
        print(f"\ninterrupted. What finished is in {out}; run the same command again to resume "
              "from the last checkpoint.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (FolderError, hg.CheckpointMismatchError) as e:
        return _error(str(e), EXIT_INPUT)
    except (ExperimentError, hg.MethodError) as e:
        return _error(str(e))
    except hg.DivergenceError as e:
        return _error(f"the run diverged: {e}", EXIT_DIVERGED)
    except OSError as e:  # a read-only folder, a full disk, data gone since the check
        return _error(os_error(e, out), EXIT_INPUT)
    print(_summary(args.experiment, result, out, time.perf_counter() - started))
    return EXIT_OK


def _plan_arguments(sub) -> argparse.ArgumentParser:
    plan = sub.add_parser(
        "plan", help="every hypergradient method for an experiment's training run: memory, time, the choice",
        description="Print hg.plan's table for the experiment's training run at its first λ_0: each method's "
        "XLA temporary memory (compiled, not run), its predicted time (from a short timed training run) "
        "and whether it is exact; the choice is the fastest exact method within the budget (what --method "
        "auto runs).")
    plan.add_argument("experiment", metavar="EXPERIMENT", choices=experiments.names(),
                      help="which experiment: " + ", ".join(experiments.names()))
    plan.add_argument("--memory-budget", type=positive_int, metavar="BYTES",
                      help="XLA temporary memory the hypergradient may use (default: no limit)")
    plan.add_argument("--dataset", choices=experiments.ALL_DATASETS, help="as for run")
    plan.add_argument("--data-dir", metavar="DIR", help="as for run")
    plan.add_argument("--tiny", action="store_true", help="the tiny configuration of run --tiny")
    return plan


def _plan(args: argparse.Namespace) -> int:
    module = experiments.get(args.experiment)
    if method_names.METHODS[module.METHODS[0]].realtime:
        return _error(f"experiment {args.experiment!r} is tuned in real time (hg.online); plan covers the "
                      "methods of hg.hypergrad")
    if problem := experiments.choose_dataset(args, module):
        return _error(problem)
    config = module.tiny(args.dataset) if args.tiny else module.Config(dataset=args.dataset)
    config = dataclasses.replace(config, data_dir=args.data_dir)
    from .experiments import runner  # imported with the experiment, as run does

    try:
        runner.check_data(module, config)
    except (FileNotFoundError, ValueError) as e:
        return _error(str(e), EXIT_INPUT)
    dyn, objective, lam = runner.problem(module, config)
    print(hg.plan(dyn, objective, lam, args.memory_budget))
    return EXIT_OK


def _trials(args: argparse.Namespace, config, out: Path) -> int:
    """``run --trials N``: N runs of the experiment under Ray Tune, then the best one in full in OUT/best."""
    if install := missing_extra("ray", "ray"):
        return _error(f"--trials runs on Ray, which is not installed: {install}")
    from . import tune

    print(f"hypergradient run {args.experiment} --trials {args.trials}: {args.search} search on Ray "
          f"({args.ray}) -> {out}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        found, result = tune.run_experiment(args.experiment, config, args.trials, out, address=args.ray,
                                            search=args.search, scheduler=args.scheduler,
                                            gpus_per_trial=args.gpus_per_trial, mlflow=args.mlflow)
    except KeyboardInterrupt as e:  # tune.Interrupted says how many trials finished
        print(f"\ninterrupted{f': {e}' if str(e) else ''}; run the same command again to resume the trials "
              f"(Tune's records are in {out / 'ray'}).", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ExperimentError, ImportError, ConnectionError) as e:
        return _error(str(e))
    except OSError as e:  # a read-only folder, a full disk
        return _error(os_error(e, out), EXIT_INPUT)
    columns = [k for k in found.rows[0] if k != "hyper_steps"]
    print(_table(columns, [[r[k] for k in columns] for r in found.rows]))
    print(_summary(args.experiment, result, out / "best", time.perf_counter() - started))
    print(f"best trial {found.best['trial']}; wrote trials.csv, trials.png to {out}")
    return EXIT_OK


def _folder_name(args: argparse.Namespace, method: str) -> str:
    name = f"{args.experiment}-{args.dataset}-{method}"
    if args.tiny:
        name += "-tiny"
    if args.seed:
        name += f"-seed{args.seed}"
    if args.trials:
        name += f"-trials{args.trials}"
    return name


# -- output ----------------------------------------------------------------------------

def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _table(header, rows) -> str:
    rows = [tuple(_fmt(x) for x in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip(), line]
    out += ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


def _summary(name: str, result: dict, out: Path, seconds: float) -> str:
    """The result's scalars as a table, then any list of records (such as per-R rows) as its own table."""
    skip = {"experiment", "plots", "arrays", "grid", "seconds", "note"}

    def is_records(v):
        return isinstance(v, list) and bool(v) and isinstance(v[0], dict)

    scalars = [(k, v) for k, v in result.items() if k not in skip and not isinstance(v, dict) and not is_records(v)]
    parts = [f"\n{name}: summary", _table(("metric", "value"), scalars)]
    for key, value in result.items():
        if is_records(value):
            columns = [k for k in value[0] if not isinstance(value[0][k], str)]
            parts += [f"\n{key}", _table(columns, [[r[k] for k in columns] for r in value])]
    if result.get("note"):
        parts.append(f"\nnote: {result['note']}")
    files = ", ".join(["config.json", *folder.output_files(result)])
    parts.append(f"\nwrote {files} to {out}  ({seconds:.0f} s)")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
