"""``compare(...)``: every method on every regime and seed, at the same budget, then the files."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from ..terminal import say
from . import records
from .clock import Run
from .problem import REGIMES, problems
from .report import summarize, write_outputs
from .runners import (METHODS, STUDIES, open_storage, run_black_box, run_hybrid, run_hypergradient, run_online,
                      score_choice, study_name)
from .space import space_size


def compare(experiment: str, dataset: str = "digits", data_dir: str | None = None, *, budget: float = 60.0,
            seeds: int = 1, regimes: Sequence[str] = REGIMES, methods: Sequence[str] = METHODS,
            tiny: bool = False, out: str | os.PathLike = "results/compare", storage: str | None = None) -> dict:
    """Run the comparison and write its files; returns ``{"runs": [...], "summary": [...], ...}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage_spec = storage or str(out / "optuna.journal")
    store = open_storage(storage_spec) if set(STUDIES) & set(methods) else None
    built = problems(experiment, dataset, data_dir, tiny)
    runs: list[Run] = []
    compile_seconds = {}
    for regime in regimes:
        problem = built[regime]
        say(f"[{regime}] {space_size(problem.space)} hyperparameters; {problem.description}")
        compile_seconds[regime] = problem.programs.warm_up(methods)
        say(f"[{regime}] compiled in {compile_seconds[regime]:.1f} s (not counted in any budget)")
        for seed in range(seeds):
            for method in methods:
                key = {"experiment": experiment, "dataset": dataset, "tiny": tiny, "regime": regime,
                       "method": method, "seed": seed, "budget": budget}
                started = time.perf_counter()
                if method in STUDIES:
                    name = study_name(experiment, dataset, tiny, regime, method, seed)
                    run = (run_hybrid(problem, seed, budget, store, name) if method == "hybrid"
                           else run_black_box(method, problem, seed, budget, store, name))
                else:
                    run = records.load(out, key)
                    if run is not None:
                        run.note = (run.note + "; " if run.note else "") + "read back from runs/"
                    else:
                        fn = run_hypergradient if method in ("hypergradient", "es") else run_online
                        run = fn(problem, seed, budget, method)
                        records.save(out, key, run)
                score_choice(problem, run)
                runs.append(run)
                say(f"[{regime}] seed {seed} {method:<13} best val {run.best_val:.4f}  test error "
                    f"{run.test_error:.4f}  ({run.evaluations} evaluations, {time.perf_counter() - started:.0f} s "
                    f"wall){'  ' + run.note if run.note else ''}")
    summary = summarize(runs, {r: space_size(built[r].space) for r in regimes})
    write_outputs(out, runs, summary, budget, experiment, dataset, compile_seconds, storage_spec)
    return {"runs": runs, "summary": summary, "compile_seconds": compile_seconds, "storage": storage_spec}
