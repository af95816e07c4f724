"""B1 in one process: each method's hypergradient time as a multiple of a training run, and its memory.

B1 is built by ``benchmarks.b1`` (the spec is in its docstring). Prints one JSON
object: for every method the median seconds of the hypergradient over
``--repeats`` runs after a warm-up and of the training run, the two timed
alternately in the same process, their ratio, and XLA's peak temporary
memory for the program. Methods are names of ``hypergradient.apps.methods``;
Forward differentiates the 4 per-layer learning rates (``b1.measured_on``),
the others all 804 hyperparameters. ``--steps 2000 --methods reverse,checkpoint``
gives the long-run checkpointing figures.

    python -m benchmarks.b1_schedules [--steps 100] [--repeats 5] [--methods ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import hypergradient as hg
from benchmarks import b1
from benchmarks.record import write_report
from hypergradient.apps.methods import make


def median_seconds(fn, repeats):
    jax.block_until_ready(fn())  # warm-up: compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_medians(train, hypergrad, repeats):
    """Median seconds of ``train`` and ``hypergrad`` timed alternately (A B A B ...), after a warm-up
    of each, so load from other processes falls on both alike; the ratio of the two is the figure."""
    jax.block_until_ready(train())
    jax.block_until_ready(hypergrad())
    times = {train: [], hypergrad: []}
    for _ in range(repeats):
        for fn in times:
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[fn].append(time.perf_counter() - start)
    return statistics.median(times[train]), statistics.median(times[hypergrad])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--truncate", type=int, default=10)
    p.add_argument("--methods", default=",".join(b1.METHODS), help="names of hypergradient.apps.methods")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)

    dyn, objective, lam = b1.problem(steps=a.steps)
    train_s = median_seconds(lambda: dyn.run(lam), a.repeats)
    report = {
        "benchmark": "B1",
        "steps": a.steps,
        "dtype": str(lam["lr"].dtype),
        "backend": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_count": os.cpu_count(),
        "train_seconds": train_s,
        "methods": {},
    }
    for name in a.methods.split(","):
        method = make(name, truncation=a.truncate, checkpoint_every=a.checkpoint_every)
        hparams = b1.measured_on(name)
        d, l = b1.HPARAMS[hparams](dyn, lam)
        try:
            res = hg.hypergrad(d, objective, l, method)
        except (hg.MethodError, hg.DivergenceError) as e:  # DrMAD refuses B1: its backward pass blows up
            report["methods"][name] = {"method": repr(method), "hparams": hparams, "error": str(e)}
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        train, seconds = paired_medians(
            lambda: d.run(l), lambda: hg.hypergrad(d, objective, l, method).grad, a.repeats
        )
        report["methods"][name] = {
            "method": repr(method),
            "hparams": hparams,
            "hypergrad_seconds": seconds,
            "train_seconds": train,
            "ratio": seconds / train,
            "peak_temp_mb": res.stats["temp_bytes"] / 2**20,
            "compile_seconds": res.stats["compile_seconds"],
            "value": float(res.value),
            "grad_norm": float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(res.grad)))),
        }
        print(f"{name}: {seconds:.3f}s, ratio {seconds / train:.2f}, temp {res.stats['temp_bytes'] / 2**20:.1f} MB",
              file=sys.stderr)
    rev = report["methods"].get("reverse")
    for row in report["methods"].values():
        if rev and "error" not in row:
            row["time_vs_reverse"] = row["hypergrad_seconds"] / rev["hypergrad_seconds"]
    write_report(report, a.out)


if __name__ == "__main__":
    main()
