"""Data selection by attribution scores: drop the k most harmful training examples and retrain,
against dropping k random ones, with and without flipped labels.

Softmax regression on scikit-learn's digits (400 training examples, 300 validation, the rest
test), momentum SGD on batches of 100 for 200 steps. The scores are ``hg.attribute``'s on the
validation loss; "iterative" drops k/3 examples, rescores the run on what is left (weights
u ∈ {0, 1}^n: the scores of the weighted run at those weights) and repeats three times, in the
spirit of metagradient descent over data. Every retraining is one member of a vmapped
population; test error is the mean over ``--seeds`` (the flipped labels and random drops).

    nice -n 10 python -m benchmarks.data_selection --seeds 3
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import hypergradient as hg
from hypergradient.apps import datasets, models
from hypergradient.example_weights import weighted


def build(noise: float, seed: int):
    data = datasets.load("digits", n_train=400, n_val=300)
    y_train = data.train.y
    if noise:
        y_train, _ = datasets.flip_labels(y_train, noise, data.n_classes, seed=seed)
    x, y = jnp.asarray(data.train.x), jnp.asarray(y_train)
    xv, yv = jnp.asarray(data.val.x), jnp.asarray(data.val.y)
    xt, yt = jnp.asarray(data.test.x), jnp.asarray(data.test.y)
    apply = models.softmax_regression_apply

    def loss(w, lam, batch, *, example_weights=1.0):
        bx, by = batch
        per = -jnp.take_along_axis(jax.nn.log_softmax(apply(w, bx)), by[:, None], axis=-1)[:, 0]
        return jnp.mean(example_weights * per) + 0.5 * lam["l2"] * jnp.sum(w[0]["W"] ** 2)

    def val_loss(w, lam):
        return models.cross_entropy(apply(w, xv), yv)

    def test_error(w):
        return models.error_rate(apply(w, xt), yt)

    dyn = hg.Dynamics(models.softmax_regression_init(x.shape[1], data.n_classes), loss, hg.optim.momentum(),
                      lambda lam, t: {"lr": 0.5, "momentum": 0.9},
                      data=hg.Batches((x, y), 100, key=jax.random.key(seed)), steps=200)
    return dyn, {"l2": jnp.asarray(1e-3)}, val_loss, test_error


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--drop", default="0.1,0.2,0.3", help="fractions of the training set to drop")
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.drop.split(",")]
    print("| flipped labels | dropped | none | random | most harmful | iterative (3 rounds) |")
    print("|---|---|---|---|---|---|")
    for noise in (0.0, 0.3):
        errors = {f: {"none": [], "random": [], "harmful": [], "iterative": []} for f in fractions}
        for seed in range(args.seeds):
            dyn, lam, val_loss, test_error = build(noise, seed)
            run = weighted(dyn)
            population = jax.jit(jax.vmap(lambda u: test_error(run.run((lam, u)))))
            n = dyn.batches.size
            ones = np.ones(n, np.float32)
            scores = np.asarray(hg.attribute(dyn, val_loss, lam).scores)
            rng = np.random.default_rng(seed)
            for f in fractions:
                k = round(f * n)
                harmful, rand = ones.copy(), ones.copy()
                harmful[np.argsort(-scores)[:k]] = 0
                rand[rng.permutation(n)[:k]] = 0
                iterative = ones.copy()
                for r in range(3):
                    s = np.array(hg.attribute(dyn, val_loss, lam, weights=iterative).scores)
                    s[iterative == 0] = -np.inf
                    iterative[np.argsort(-s)[: k // 3 + (r < k % 3)]] = 0
                errs = np.asarray(population(jnp.asarray(np.stack([ones, rand, harmful, iterative]))))
                for name, e in zip(("none", "random", "harmful", "iterative"), errs):
                    errors[f][name].append(float(e))
        for f in fractions:
            e = {name: 100 * np.mean(v) for name, v in errors[f].items()}
            print(f"| {noise:.0%} | {f:.0%} | {e['none']:.1f}% | {e['random']:.1f}% | {e['harmful']:.1f}% "
                  f"| {e['iterative']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
