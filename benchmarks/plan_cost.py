"""What ``hg.plan`` costs against the run it plans, on the reference CNN (``scan_step.cnn``: 3x3
convolutions over patches with (16, 32) channels, SiLU, average pooling, a dense layer; batch
128, momentum SGD, 512 validation images, T = 100 by default).

Each measurement is a fresh process (nothing compiled before, JAX's persistent compilation cache
off), timed from the problem built to the result in hand:

- ``plan``: ``hg.plan(dyn, objective, λ)`` without a budget: its short programs, compiled and
  (the 8-step Reverse and the objective's gradient) run;
- ``reverse``: one ``hg.value_and_grad(dyn, objective, λ, method=hg.Reverse())``, jitted over
  ``(dyn, the objective's arrays, λ)``: trace and lower, compile, run.

The two alternate for ``--rounds`` rounds (their order swapped each round); the ratio plan /
reverse is taken per round, and the median reported, with plan's own prediction of Reverse's
seconds against the run's.

    python -m benchmarks.plan_cost [--steps 100] [--rounds 3] [--out benchmarks/results/plan_cost.json]

Run it with another ``PYTHONPATH`` (``PYTHONPATH=OTHER/src:.``) to measure another version of
the library: the children inherit it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.record import write_report


def child(kind: str, steps: int) -> dict:
    """One measurement in this process (``kind``: ``plan`` or ``reverse``)."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    import hypergradient as hg
    from benchmarks.scan_step import cnn
    from hypergradient._pytree import partition

    dyn, objective, lam = cnn(steps)
    jax.block_until_ready(jax.tree.leaves((dyn, objective, lam)))
    start = time.perf_counter()
    if kind == "plan":
        p = hg.plan(dyn, objective, lam)
        total = time.perf_counter() - start
        reverse = next(r for r in p.rows if r.method == hg.Reverse())
        return {"seconds": total, "predicted_reverse_run_s": reverse.seconds,
                "predicted_reverse_mib": reverse.bytes / 2**20, "predicted_training_s": p.training_seconds}
    arrays, skeleton = partition(objective)
    program = jax.jit(lambda d, a, l: hg.value_and_grad(d, skeleton.combine(a), l, hg.Reverse()))
    exe = program.lower(dyn, arrays, lam).compile()
    compiled_at = time.perf_counter()
    jax.block_until_ready(exe(dyn, arrays, lam))
    end = time.perf_counter()
    return {"seconds": end - start, "compile_s": compiled_at - start, "run_s": end - compiled_at,
            "temp_mib": exe.memory_analysis().temp_size_in_bytes / 2**20}


def measure(kind: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.plan_cost", "--child", kind, "--steps", str(steps)],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(kind, result, file=sys.stderr, flush=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=("plan", "reverse"), help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return 0
    report = {"steps": args.steps, "cpus": len(os.sched_getaffinity(0)), "load_avg_1min_start": os.getloadavg()[0],
              "pythonpath": os.environ.get("PYTHONPATH", ""), "rounds": []}
    for i in range(args.rounds):
        order = ("plan", "reverse") if i % 2 == 0 else ("reverse", "plan")
        got = {kind: measure(kind, args.steps) for kind in order}
        report["rounds"].append({**got, "ratio": got["plan"]["seconds"] / got["reverse"]["seconds"]})
    report["median_ratio"] = statistics.median(r["ratio"] for r in report["rounds"])
    report["load_avg_1min_end"] = os.getloadavg()[0]
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
