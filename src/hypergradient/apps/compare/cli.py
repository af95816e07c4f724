"""``hypergradient compare``: its arguments and what it prints."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .. import experiments
from ..experiments import runner
from ..terminal import (EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, folder_name, missing_extra, not_a_folder,
                        positive_int, positive_seconds, say)
from .problem import EXPERIMENTS, REGIMES
from .report import print_summary
from .run import compare
from .runners import METHODS, STUDIES


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
    parser.add_argument("--budget-seconds", type=positive_seconds, default=60.0, metavar="S",
                        help="wall-clock seconds per method, regime and seed, compilation excluded (default 60)")
    parser.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                        help="repetitions (weights, minibatch order, sampler seed); default 1")
    parser.add_argument("--storage", metavar="URL",
                        help="Optuna storage of the random-search, TPE and hybrid studies: a URL such as "
                        "sqlite:///study.db, or a journal file path (default OUT/optuna.journal); "
                        "the same storage resumes an interrupted comparison")
    parser.add_argument("--out", type=folder_name, metavar="DIR",
                        help="output folder (default results/compare-EXPERIMENT-DATASET[-tiny])")
    parser.add_argument("--dataset", choices=experiments.ALL_DATASETS,
                        help="digits (default), fashion-mnist, mnist; text for lm (its only one)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="folder of the IDX files (fashion-mnist, mnist), or of the text sources (lm)")
    parser.add_argument("--regime", default="both", choices=("few", "many", "both"),
                        help="few (lr, momentum, L2), many (per-step, per-layer schedules) or both (default)")
    parser.add_argument("--methods", type=_methods, default=METHODS, metavar="M[,M...]",
                        help="a subset of " + ",".join(METHODS) + " (default: all)")
    parser.add_argument("--tiny", action="store_true", help="the experiment's tiny configuration (a smoke test)")


def _error(message: str, code: int = EXIT_USAGE) -> int:
    print(f"hypergradient compare: error: {message}", file=sys.stderr)
    return code


def main(args: argparse.Namespace) -> int:
    """Run ``hypergradient compare`` with parsed ``args``; print the summary; return the exit code."""
    studies = [m for m in args.methods if m in STUDIES]
    install = missing_extra("optuna", "compare") if studies else None
    if install:
        names = " and ".join([", ".join(studies[:-1]), studies[-1]] if len(studies) > 1 else studies)
        return _error(f"{names} need{'s' if len(studies) == 1 else ''} optuna, which is not installed: {install} "
                      "(or leave them out: --methods hypergradient,online)")
    module = experiments.get(args.experiment)
    if problem := experiments.choose_dataset(args, module):
        return _error(problem)
    regimes = REGIMES if args.regime == "both" else (args.regime,)
    out = Path(args.out) if args.out is not None else Path("results") / (
        f"compare-{args.experiment}-{args.dataset}" + ("-tiny" if args.tiny else ""))
    if problem := not_a_folder(out):
        return _error(f"cannot write the results to {out}: {problem}", EXIT_INPUT)
    try:
        runner.check_data(module, dataclasses.replace(module.Config(dataset=args.dataset), data_dir=args.data_dir))
    except (FileNotFoundError, ValueError) as e:
        return _error(str(e), EXIT_INPUT)
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

