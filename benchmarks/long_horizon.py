"""B1 over long horizons: every method's XLA temporary memory and time as a multiple of a training
run at T = 10,000 and 100,000, and the largest T each method reaches within a memory budget.

The problem is B1 (``benchmarks/README.md``) with T steps: per-step, per-layer learning rates and
momenta, so m = 8T + 4 hyperparameters (Forward, at m·d, does not apply). The methods are
:func:`hypergradient.plan`'s rows (``hypergradient.planning.candidates``). Memory is XLA's
figure for the compiled program; a method is run and timed at T only when it fits the budget
(``--run all``) or when it is the plan's choice (``--run choice``: the long horizons, where each run
takes minutes). Each hypergradient is timed once, as the compiled program itself, paired with a
training run timed just before it (the load on 2 shared cores varies; a repeat costs as much as
the run). A run whose hypergradient is not finite is timed too: B1's lr 0.5, μ 0.9 is chaotic over
thousands of steps, and its backward pass overflows float32 (``finite``, ``backward_growth``).
The largest T within the budget is found by compiling only: doubling T from 100 up to 10^7,
then bisecting to within 10%.

    python -m benchmarks.long_horizon --steps 10000 --run all
    python -m benchmarks.long_horizon --steps 100000 --run choice
    python -m benchmarks.long_horizon --largest

Each invocation updates its entries of ``--out`` (default ``benchmarks/results/long_horizon.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import hypergradient as hg
from benchmarks import b1
from hypergradient._pytree import partition
from hypergradient.dynamics import train
from hypergradient.hypergrad import compiled
from hypergradient.planning import candidates, choose, program_bytes

MB = 2**20
OUT = Path(__file__).parent / "results" / "long_horizon.json"


def hparam_shapes(steps, layers=4):
    """B1's λ at T = ``steps`` as shapes only (the largest horizons are compiled, never run)."""
    shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)  # noqa: E731
    return {"log_l2": shape(layers), "lr": shape(steps, layers), "momentum": shape(steps, layers)}


def family(method) -> str:
    """The name of a row's method without its T-dependent setting."""
    levels = getattr(method, "levels", None)
    if levels is not None:
        return {0: "Reverse", 1: "Reverse, 1 level"}.get(len(levels), f"Reverse, {len(levels)} levels")
    return type(method).__name__


def at(steps: int, args) -> dict:
    """Every row's memory at ``steps``; the training run and the rows that fit (or the choice), timed."""
    dyn, objective, lam = b1.problem(steps)
    rows = [r._replace(method=r.method.resolve(dyn, lam)) for r in candidates(dyn, lam)]
    programs = {r.method: compiled(dyn, objective, r.method, lam) for r in rows}
    sizes = {method: sizes["temp_bytes"] for method, (_, _, sizes) in programs.items()}
    choice = choose(rows, args.budget, lambda r: sizes[r.method]).method
    training = train.lower(dyn, lam).compile()
    print(f"T = {steps}: plan's choice {choice!r}", file=sys.stderr, flush=True)
    out = {"choice": repr(choice), "methods": {}}
    for r in rows:
        entry = {"family": family(r.method), "exact": r.exact, "temp_mb": sizes[r.method] / MB,
                 "fits": sizes[r.method] <= args.budget}
        if entry["fits"] and (args.run == "all" or r.method == choice):
            train_s = seconds(lambda: training(dyn, lam))  # paired with the run: the load on shared cores varies
            sol, hypergrad_s = seconds(lambda: programs[r.method][0](dyn, partition(objective)[0], lam), True)
            growth = sol.stats.get("backward_growth")
            entry.update(train_seconds=train_s, seconds=hypergrad_s, ratio=hypergrad_s / train_s,
                         value=float(sol.value), finite=not bool(sol.diverged),
                         backward_growth=None if growth is None else float(growth))
        out["methods"][repr(r.method)] = entry
        print(f"  {r.method!r}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    return out


def seconds(fn, keep=False):
    """Wall seconds of one call of ``fn`` (and its result when ``keep``)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    elapsed = time.perf_counter() - start
    return (out, elapsed) if keep else elapsed


def largest(args) -> dict:
    """Per family (``args.family``: those only), the largest T whose program fits the budget
    (compiled from shapes, not run)."""
    dyn, objective, small = b1.problem(100)
    reversible = hg.Reversible().resolve(dyn, small)  # sized by the momentum, the same at every T

    def memory(name, steps):
        long = copy.copy(dyn)
        long.steps = steps
        lam = hparam_shapes(steps)
        methods = [reversible] if name == "Reversible" else [
            r.method for r in candidates(long, small) if family(r.method) == name]
        return min(((program_bytes(long, objective, m, lam), m) for m in methods), default=None, key=lambda bm: bm[0])

    out = {}
    for name in args.family or sorted({family(r.method) for r in candidates(dyn, small)}):
        fit, over, steps = None, None, 100
        while steps <= 10**7 and over is None:
            m = memory(name, steps)
            if m is not None and m[0] <= args.budget:
                fit = (steps, *m)
                steps *= 2
            else:
                over = steps
        while fit is not None and over is not None and over > 1.1 * fit[0]:
            mid = int(np.sqrt(fit[0] * over))
            m = memory(name, mid)
            if m is not None and m[0] <= args.budget:
                fit = (mid, *m)
            else:
                over = mid
        out[name] = {"largest_steps": fit and fit[0], "method": fit and repr(fit[2]),
                     "temp_mb": fit and fit[1] / MB, "first_over": over}
        print(f"{name}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="*", default=[], help="horizons T to measure")
    p.add_argument("--run", choices=("all", "choice"), default="all",
                   help="time every method that fits, or the plan's choice only")
    p.add_argument("--largest", action="store_true", help="find each method's largest T within the budget")
    p.add_argument("--family", nargs="*", help="with --largest: these families only (default: all)")
    p.add_argument("--budget", type=int, default=200 * MB, help="XLA temporary memory allowed, bytes")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    report = json.loads(a.out.read_text()) if a.out.exists() else {}
    report.update(benchmark="B1 long horizons", budget_mb=a.budget / MB, backend=jax.default_backend(),
                  cpu_count=os.cpu_count(), dtype="float32")
    for steps in a.steps:
        report.setdefault("horizons", {})[str(steps)] = at(steps, a)
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    if a.largest:
        report.setdefault("largest_steps_within_budget", {}).update(largest(a))
        a.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
