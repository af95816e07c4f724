"""A population of tuning runs in one program: eight initial learning-rate scales at once.

A tanh MLP on scikit-learn's digits learns a per-step learning-rate schedule by Reverse-HG. Which
scale to start the schedule from is outside what one hypergradient run tunes, so eight runs start
from eight scales, 0.01 to 3, and ``hg.optimize(..., population_axis=0)`` runs them as one vmapped
program: each hyper-step is one compiled call for all eight. The best member comes back as
``.hparams``; every member's final validation loss as ``.population_values``.

Run:  python examples/population.py
Prints each starting scale with its final validation loss and the member chosen, e.g.
    start lr 0.010 -> validation loss 2.187
    ...
    start lr 3.000 -> validation loss 0.153
    best: start lr 3.000 -> 0.153
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypergradient as hg
from hypergradient.apps import datasets, models

SCALES = (0.01, 0.03, 0.1, 0.2, 0.3, 0.6, 1.0, 3.0)


def main(hyper_steps: int = 15, steps: int = 40):
    d = datasets.load("digits")
    w0 = models.mlp_init(jax.random.PRNGKey(0), (64, 32, 10))

    def loss(w, lam, batch):
        x, y = batch
        return models.cross_entropy(models.mlp_apply(w, x), y)

    dyn = hg.Dynamics(init=w0, loss=loss, optimizer=hg.optim.momentum(dampen=True),
                      optimizer_hparams=lambda lam, t: {"lr": jnp.exp(lam["log_lr"][t]), "momentum": 0.9},
                      data=hg.Batches((jnp.asarray(d.train.x), jnp.asarray(d.train.y)), batch_size=100), steps=steps)
    objective = jax.tree_util.Partial(lambda xv, yv, w, lam: models.cross_entropy(models.mlp_apply(w, xv), yv),
                                      jnp.asarray(d.val.x), jnp.asarray(d.val.y))
    lam0 = {"log_lr": jnp.log(jnp.asarray(SCALES))[:, None] * jnp.ones((1, steps))}  # K = 8 members on axis 0
    res = hg.optimize(dyn, objective, lam0, hyper_optimizer=optax.adam(0.05), hyper_steps=hyper_steps,
                      population_axis=0)
    return res


if __name__ == "__main__":
    res = main()
    for s, v in zip(SCALES, res.population_values):
        print(f"start lr {s:.3f} -> validation loss {v:.3f}")
    print(f"best: start lr {SCALES[int(np.argmin(res.population_values))]:.3f} -> {res.value:.3f}")
