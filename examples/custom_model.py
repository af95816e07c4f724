"""Any model works: hypergradient only needs a pure function of a weight pytree.

`hg.Dynamics` never looks inside the model. Its training loss is a function
``(w, λ, batch) -> scalar`` where ``w`` is any pytree of arrays, so a model
can come from anywhere as long as it is given as

    apply(weights, x) -> logits          (pure, differentiable in JAX)

This example writes such a model by hand (a residual MLP with layer norm,
weights in a nested dict, unlike ``hg.models``' list of layers) and tunes its
learning-rate schedule and weight decay on digits with Reverse-HG.

A Flax or Equinox model plugs in the same way:

    # Flax (linen):  weights = model.init(key, x)["params"]
    #                apply   = lambda w, x: model.apply({"params": w}, x)
    # Equinox:       weights, static = eqx.partition(model, eqx.is_inexact_array)
    #                apply   = lambda w, x: jax.vmap(eqx.combine(w, static))(x)

(neither package is a dependency of hypergradient; install one to use it).

Run:  python examples/custom_model.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypergradient as hg
from hypergradient.apps import datasets


def init_weights(key, n_in: int, width: int, n_out: int) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "embed": {"kernel": jax.random.normal(k1, (n_in, width)) / np.sqrt(n_in), "bias": jnp.zeros(width)},
        "block": {
            "kernel": jax.random.normal(k2, (width, width)) / np.sqrt(width),
            "bias": jnp.zeros(width),
            "scale": jnp.ones(width),
        },
        "head": {"kernel": jax.random.normal(k3, (width, n_out)) / np.sqrt(width), "bias": jnp.zeros(n_out)},
    }


def apply(w: dict, x: jax.Array) -> jax.Array:
    """A residual block with layer norm between an embedding and a linear head."""
    h = jnp.tanh(x @ w["embed"]["kernel"] + w["embed"]["bias"])
    z = h @ w["block"]["kernel"] + w["block"]["bias"]
    z = (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + 1e-5) * w["block"]["scale"]
    h = h + jnp.tanh(z)
    return h @ w["head"]["kernel"] + w["head"]["bias"]


def cross_entropy(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def main(hyper_steps: int = 30) -> None:
    data = datasets.load("digits")
    (x, y), (xv, yv) = data.train, data.val
    steps = 60
    w0 = init_weights(jax.random.PRNGKey(0), x.shape[1], 32, data.n_classes)

    def loss(w, lam, batch):
        bx, by = batch
        decay = sum(jnp.sum(k**2) for k in jax.tree.leaves(w))
        return cross_entropy(apply(w, bx), by) + jnp.exp(lam["log_decay"]) * decay

    def objective(w, lam):
        return cross_entropy(apply(w, jnp.asarray(xv)), jnp.asarray(yv))

    dyn = hg.Dynamics(
        init=w0,
        loss=loss,
        optimizer=hg.optim.momentum(),
        # One learning rate per training step; it applies to every leaf of the dict.
        optimizer_hparams=lambda lam, t: {"lr": jnp.exp(lam["log_lr"][t]), "momentum": 0.9},
        data=hg.Batches((jnp.asarray(x), jnp.asarray(y)), batch_size=100, key=jax.random.PRNGKey(1)),
        steps=steps,
    )
    lam0 = {"log_lr": jnp.full(steps, np.log(0.05), jnp.float32), "log_decay": jnp.asarray(np.log(1e-4), jnp.float32)}
    before = float(objective(dyn.run(lam0), lam0))
    res = hg.optimize(dyn, objective, lam0, method=hg.Reverse(), hyper_optimizer=optax.adam(0.05),
                      hyper_steps=hyper_steps)
    print(f"validation loss: {before:.4f} -> {res.value:.4f}")
    print(f"learning rate: first step {float(np.exp(res.hparams['log_lr'][0])):.3f}, "
          f"last step {float(np.exp(res.hparams['log_lr'][-1])):.3f}; "
          f"weight decay {float(np.exp(res.hparams['log_decay'])):.2e}")


if __name__ == "__main__":
    main()
