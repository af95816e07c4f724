"""Mixed precision: what a bfloat16 run changes in the hypergradient, and what its bfloat16 backward pass loses.

Two problems, each in three precisions: ``float32``; ``bf16-compute`` (float32 master weights
and optimizer state, the loss casting weights and inputs to bfloat16 with
``hg.precision.to_compute`` and its logits back to float32); ``bf16-weights`` (the whole state,
weights and optimizer state, in bfloat16, the same loss). Every bfloat16 run is differentiated
twice: by plain autodiff (``hg.Reverse()``, its backward pass in bfloat16 like its forward pass)
and with the adjoint in float32 (``hg.Reverse(adjoint_dtype=jnp.float32)``, the exact derivative
of the same bfloat16 run up to its roundings). So

- ``adjoint32 vs float32``: what the bfloat16 *run* changes (its hypergradient is another run's);
- ``plain vs adjoint32``: what the bfloat16 *backward pass* loses on top;
- ``plain vs float32``: both, what a user of plain autodiff gets.

Per group of hyperparameters: the relative error ‖a − b‖ / ‖b‖ and, for a vector, the cosine.
XLA's temporary memory of each program and the median time of ``--repeats`` calls (the
programs timed in turn, round after round, so load falls on all alike), as a ratio to the
float32 run's plain Reverse; timings on a shared machine are noisy, read the ratios.

- ``cnn``: the reference CNN (``models.cnn_init``: two 3x3 conv blocks of 8 and 16 channels,
  SiLU, average pooling, dense) on scikit-learn's digits (800 train / 500 validation), Adam,
  batch 100; λ = log peak learning rate, log weight decay (L2, on the float32 value of the
  weights) and a per-step multiplier of a warmup-cosine schedule; objective the validation
  cross-entropy in float32.
- ``b1``: B1 (``benchmarks/b1.py``; 4 log L2, T × 4 learning rates and momenta).

    python -m benchmarks.mixed_precision --repeats 3 --out benchmarks/results/mixed_precision.json
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import hypergradient as hg
from benchmarks import b1
from benchmarks.record import write_report
from hypergradient.apps import datasets, models

F32, BF16 = jnp.float32, jnp.bfloat16
#: precision -> (dtype of the weights and optimizer state, dtype the loss computes in)
PRECISIONS = {"float32": (F32, F32), "bf16-compute": (F32, BF16), "bf16-weights": (BF16, BF16)}


def _f32(tree):
    return jax.tree.map(lambda a: a.astype(F32), tree)


def _sum_squares(w):
    return sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(_f32(w)))


# ---------------------------------------------------------------- the reference CNN


def cnn_loss(compute):
    def loss(w, lam, batch):
        x, y = batch
        wc, xc = hg.precision.to_compute((w, x), compute)
        logits = models.cnn_apply(wc, xc).astype(F32)
        return models.cross_entropy(logits, y) + jnp.exp(lam["log_wd"]) * _sum_squares(w)
    return loss


def warmup_cosine(t, steps):
    """Linear warmup over the first tenth of the run, then a cosine down to a tenth of the peak."""
    warm = max(steps // 10, 1)
    frac = jnp.clip((t - warm) / max(steps - warm, 1), 0.0, 1.0)
    return jnp.where(t < warm, (t + 1) / warm, 0.1 + 0.45 * (1 + jnp.cos(jnp.pi * frac)))


@functools.cache
def _digits():
    return datasets.load("digits")


def cnn_problem(precision, steps):
    weights, compute = PRECISIONS[precision]
    d = _digits()
    w0 = jax.tree.map(lambda a: a.astype(weights), models.cnn_init(jax.random.PRNGKey(0), (8, 8), 10))
    x_val, y_val = jnp.asarray(d.val.x), jnp.asarray(d.val.y)

    def hparams(lam, t):
        return {"lr": jnp.exp(lam["log_peak_lr"]) * warmup_cosine(t, steps) * lam["schedule"][t]}

    dyn = hg.Dynamics(w0, cnn_loss(compute), hg.optim.adam(), hparams,
                      data=hg.Batches((jnp.asarray(d.train.x), jnp.asarray(d.train.y)), 100, key=jax.random.PRNGKey(1)),
                      steps=steps)
    objective = jax.tree_util.Partial(_cnn_validation, x_val, y_val)
    lam = {"log_peak_lr": jnp.asarray(np.log(0.01), F32), "log_wd": jnp.asarray(np.log(1e-4), F32),
           "schedule": jnp.ones(steps, F32)}
    return dyn, objective, lam


def _cnn_validation(x, y, w, lam):
    return models.cross_entropy(models.cnn_apply(_f32(w), x), y)


# ---------------------------------------------------------------- B1 in bfloat16


def b1_loss(compute):
    def loss(w, lam, batch):
        x, y = batch
        wc, xc = hg.precision.to_compute((w, x), compute)
        logits = models.mlp_apply(wc, xc).astype(F32)
        return models.cross_entropy(logits, y) + models.l2_penalty(_f32(w), jnp.exp(lam["log_l2"]))
    return loss


@functools.cache
def _b1(steps):
    return b1.problem(steps=steps)


def b1_problem(precision, steps):
    weights, compute = PRECISIONS[precision]
    dyn, objective, lam = _b1(steps)
    if precision != "float32":
        dyn = dyn.replace(init=jax.tree.map(lambda a: a.astype(weights), dyn.init), loss=b1_loss(compute))
    return dyn, objective, lam


PROBLEMS = {"cnn": cnn_problem, "b1": b1_problem}


# ---------------------------------------------------------------- measuring


def compare(a, b) -> dict:
    """Per group of λ: ‖a − b‖ / ‖b‖, and the cosine for a vector group."""
    out = {}
    for k in b:
        x, y = np.ravel(np.asarray(a[k], np.float64)), np.ravel(np.asarray(b[k], np.float64))
        row = {"rel_error": float(np.linalg.norm(x - y) / np.linalg.norm(y))}
        if x.size > 1:
            row["cosine"] = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
        out[k] = row
    x = np.concatenate([np.ravel(np.asarray(a[k], np.float64)) for k in b])
    y = np.concatenate([np.ravel(np.asarray(b[k], np.float64)) for k in b])
    out["all"] = {"rel_error": float(np.linalg.norm(x - y) / np.linalg.norm(y)),
                  "cosine": float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))}
    return out


def measure(name, steps, repeats) -> dict:
    make = PROBLEMS[name]
    calls, rows = {}, {}
    for precision in PRECISIONS:
        dyn, objective, lam = make(precision, steps)
        for method_name, method in (("plain", hg.Reverse()), ("adjoint32", hg.Reverse(adjoint_dtype=F32))):
            res = hg.hypergrad(dyn, objective, lam, method)
            key = f"{precision}/{method_name}"
            rows[key] = {"value": float(res.value), "temp_mb": res.stats["temp_bytes"] / 2**20,
                         "compile_seconds": res.stats["compile_seconds"], "grad": res.grad}
            calls[key] = (lambda d=dyn, o=objective, l=lam, m=method: hg.hypergrad(d, o, l, m).grad)
            print(f"{name} {key}: value {float(res.value):.5f}, temp {rows[key]['temp_mb']:.1f} MB, "
                  f"compile {res.stats['compile_seconds']:.1f} s", file=sys.stderr)
        calls[f"{precision}/train"] = (lambda d=dyn, l=lam: d.run(l))
        jax.block_until_ready(calls[f"{precision}/train"]())  # compiles it
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - start)
    base = statistics.median(times["float32/plain"])
    for k in calls:
        rows.setdefault(k, {})["seconds"] = statistics.median(times[k])
        rows[k]["time_vs_float32_reverse"] = rows[k]["seconds"] / base

    ref = rows["float32/plain"]["grad"]
    errors = {"float32: adjoint32 vs plain": compare(rows["float32/adjoint32"]["grad"], ref)}
    for precision in ("bf16-compute", "bf16-weights"):
        plain, adj = rows[f"{precision}/plain"]["grad"], rows[f"{precision}/adjoint32"]["grad"]
        errors[f"{precision}: adjoint32 vs float32 (the run)"] = compare(adj, ref)
        errors[f"{precision}: plain vs adjoint32 (the backward pass)"] = compare(plain, adj)
        errors[f"{precision}: plain vs float32 (both)"] = compare(plain, ref)
    for row in rows.values():
        row.pop("grad", None)
    return {"steps": steps, "runs": rows, "errors": errors}


def markdown(report) -> str:
    lines = []
    for name, p in report["problems"].items():
        groups = [g for g in next(iter(p["errors"].values())) if g != "all"] + ["all"]
        lines += [f"### {name} (T = {p['steps']})", "",
                  "| comparison | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
        for what, errs in p["errors"].items():
            cells = [f"{e['rel_error']:.2g}" + (f" (cos {e['cosine']:.5f})" if "cosine" in e else "")
                     for e in (errs[g] for g in groups)]
            lines.append(f"| {what} | " + " | ".join(cells) + " |")
        lines += ["", "| run | value | XLA temp MB | time / float32 Reverse |", "|---|---|---|---|"]
        for k, r in p["runs"].items():
            value = f"{r['value']:.5f}" if "value" in r else ""
            temp = f"{r['temp_mb']:.1f}" if "temp_mb" in r else ""
            lines.append(f"| {k} | {value} | {temp} | {r['time_vs_float32_reverse']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", default="cnn,b1")
    p.add_argument("--cnn-steps", type=int, default=100)
    p.add_argument("--b1-steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="also write the JSON here, and the Markdown tables beside it (.md)")
    a = p.parse_args(argv)
    report = {"benchmark": "mixed_precision", "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
              "command": "python -m benchmarks.mixed_precision " + " ".join(argv if argv is not None else sys.argv[1:]),
              "problems": {}}
    for name in a.problems.split(","):
        report["problems"][name] = measure(name, a.cnn_steps if name == "cnn" else a.b1_steps, a.repeats)
    write_report(report, a.out)
    table = markdown(report)
    print(table, file=sys.stderr)
    if a.out:
        with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
