"""B1: the benchmark this project is judged on (after Maclaurin et al. 2015, §3.1).

Fashion-MNIST training images [0:10000] train, [10000:20000] validate,
pixels/255; MLP 784-50-50-50-10, tanh, W ~ N(0,1)/sqrt(fan_in), b = 0;
T = 100 steps, minibatch t = train[(t·200) mod 10000 : +200]; training loss
= mean cross-entropy + Σ_l exp(logL2_l)·||W_l||²; per-step, per-layer learning
rate (0.5) and momentum (0.9) with v = μv + (1−μ)g, w = w − ηv; objective:
validation cross-entropy at w_T.

Prints one JSON object: for every method the median seconds of the
hypergradient over ``--repeats`` runs after a warm-up and of the training
run, the two timed alternately in the same process, their ratio, and XLA's
peak temporary memory for the program. ``--steps 2000 --methods reverse,checkpoint``
gives the long-run checkpointing figures.

    python benchmarks/b1_schedules.py [--steps 100] [--repeats 5] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import hypergradient as hg
from hypergradient import datasets, models


def load_data(n_train=10000, n_val=10000):
    """Fashion-MNIST if installed, else scikit-learn's digits (with a message)."""
    try:
        d = datasets.load("fashion-mnist", n_train=n_train, n_val=n_val, n_test=1)
    except FileNotFoundError as e:
        print(f"B1: Fashion-MNIST not found, falling back to digits ({e.args[0].splitlines()[0]}); "
              "install it with `apt-get install dataset-fashion-mnist`", file=sys.stderr)
        d = datasets.load("digits")
    return d


def b1_problem(steps=100, batch_size=200, seed=0, data=None):
    """The B1 dynamics, objective and λ (float32 unless x64 is on)."""
    d = data or load_data()
    x, y = jnp.asarray(d.train.x), jnp.asarray(d.train.y)
    xv, yv = jnp.asarray(d.val.x), jnp.asarray(d.val.y)
    sizes = (x.shape[1], 50, 50, 50, d.n_classes)
    w0 = models.mlp_init(jax.random.PRNGKey(seed), sizes)
    layers = len(w0)

    def loss(w, lam, batch):
        bx, by = batch
        return models.cross_entropy(models.mlp_apply(w, bx), by) + models.l2_penalty(w, jnp.exp(lam["log_l2"]))

    dyn = hg.Dynamics(
        init=w0,
        loss=loss,
        optimizer=hg.optim.momentum(dampen=True),
        optimizer_hparams=lambda lam, t: {"lr": list(lam["lr"][t]), "momentum": list(lam["momentum"][t])},
        data=hg.Batches((x, y), batch_size),
        steps=steps,
    )

    def objective(w, lam):
        return models.cross_entropy(models.mlp_apply(w, xv), yv)

    lam = {
        "log_l2": jnp.full(layers, -8.0),
        "lr": jnp.full((steps, layers), 0.5),
        "momentum": jnp.full((steps, layers), 0.9),
    }
    return dyn, objective, lam


def per_layer_lr_problem(dyn, lam):
    """The same run with only the 4 per-layer learning rates as hyperparameters (m = 4)."""
    fixed = lam

    def hparams(lr, t):
        return {"lr": list(lr["lr_layer"]), "momentum": list(fixed["momentum"][t])}

    def loss(w, lr, batch):
        return dyn.loss(w, fixed, batch)

    small = hg.Dynamics(dyn.init, loss, dyn.optimizer, hparams, dyn.data, dyn.steps)
    return small, {"lr_layer": lam["lr"][0]}


def emit(report: dict, out: str | None) -> None:
    """Print the report as JSON, and write it to ``out`` too when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


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


METHODS = {
    "reverse": lambda a: hg.Reverse(),
    "checkpoint": lambda a: hg.Reverse(checkpoint_every=a.checkpoint_every),
    "truncated": lambda a: hg.Truncated(a.truncate),
    "forward-4lr": lambda a: hg.Forward(),
    "reversible": lambda a: hg.Reversible(),
    "drmad": lambda a: hg.DrMAD(),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--truncate", type=int, default=10)
    p.add_argument("--methods", default=",".join(m for m in METHODS if hasattr(hg, "Reversible") or m not in ("reversible", "drmad")))
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)

    dyn, objective, lam = b1_problem(steps=a.steps)
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
        method = METHODS[name](a)
        d, l = per_layer_lr_problem(dyn, lam) if name == "forward-4lr" else (dyn, lam)
        res = hg.hypergrad(d, objective, l, method)
        train, seconds = paired_medians(
            lambda: d.run(l), lambda: hg.hypergrad(d, objective, l, method).grad, a.repeats
        )
        report["methods"][name] = {
            "method": repr(method),
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
        if rev:
            row["time_vs_reverse"] = row["hypergrad_seconds"] / rev["hypergrad_seconds"]
    emit(report, a.out)


if __name__ == "__main__":
    main()
