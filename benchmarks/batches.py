"""What shuffling costs a training run: ``hg.Batches`` in the data's order against shuffled.

One training run (``hypergradient.dynamics.train``: the jitted ``lax.scan`` over T steps) of an
MLP 32-64-10 (tanh, cross-entropy, ``hg.optim.sgd``) on n random examples, batch 100, with its
data given three ways:

- ``ordered``: ``hg.Batches((x, y), 100)``, each batch a slice;
- ``shuffled``: ``hg.Batches((x, y), 100, key=...)``, the library's per-epoch shuffle;
- ``sorted``: a per-epoch ``jax.random.permutation`` of all n drawn at every step and sliced (what
  ``Batches`` did before its shuffle was evaluated at the step's positions only), for reference.

Times are seconds per run (median over ``--repeats`` rounds, the variants alternated each round);
the ratios to ``ordered`` are taken per round, then the median, so load from others falls on all.

    nice -n 10 python -m benchmarks.batches [--sizes 3000,60000] [--steps 300] [--repeats 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import hypergradient as hg
from benchmarks.record import write_report
from hypergradient.apps import models
from hypergradient.dynamics import train

BATCH, FEATURES, HIDDEN, CLASSES = 100, 32, 64, 10


def _loss(w, lam, batch):
    x, y = batch
    return models.cross_entropy(models.mlp_apply(w, x), y)


def _sorted_batches(x, y, key, n_batches):
    """Step t's batch from a permutation of all n examples, drawn at every step."""
    n = x.shape[0]

    def data(t):
        epoch, i = jnp.divmod(t, n_batches)
        idx = jax.lax.dynamic_slice_in_dim(jax.random.permutation(jax.random.fold_in(key, epoch), n), i * BATCH, BATCH)
        return x[idx], y[idx]

    return data


def variants(n: int, steps: int) -> dict[str, hg.Dynamics]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, FEATURES)), jnp.float32)
    y = jnp.asarray(rng.integers(0, CLASSES, n))
    key = jax.random.key(1)
    w0 = models.mlp_init(jax.random.key(0), (FEATURES, HIDDEN, CLASSES))
    sources = {"ordered": hg.Batches((x, y), BATCH), "shuffled": hg.Batches((x, y), BATCH, key=key),
               "sorted": _sorted_batches(x, y, key, n // BATCH)}
    return {name: hg.Dynamics(init=w0, loss=_loss, optimizer=hg.optim.sgd(),
                              optimizer_hparams=lambda lam, t: {"lr": lam["lr"]}, data=data, steps=steps)
            for name, data in sources.items()}


def measure(n: int, steps: int, repeats: int) -> dict:
    runs = variants(n, steps)
    lam = {"lr": jnp.asarray(0.1)}
    for dyn in runs.values():  # compile
        jax.block_until_ready(train(dyn, lam))
    seconds = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(train(runs[name], lam))
            seconds[name].append(time.perf_counter() - start)
    return {"n": n, "steps": steps, "batch": BATCH,
            "seconds": {name: statistics.median(s) for name, s in seconds.items()},
            "ratio_to_ordered": {name: statistics.median(a / b for a, b in zip(s, seconds["ordered"]))
                                 for name, s in seconds.items() if name != "ordered"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3000,60000")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out")
    args = parser.parse_args()
    report = {"devices": str(jax.devices()[0]),
              "runs": [measure(int(n), args.steps, args.repeats) for n in args.sizes.split(",")]}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
