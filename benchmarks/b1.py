"""B1, the benchmark this project is judged on (after Maclaurin et al. 2015, §3.1), built in one place.

Fashion-MNIST training images [0:10000] train, [10000:20000] validate, pixels/255 (scikit-learn's
digits, with a message, when Fashion-MNIST is not installed); MLP 784-50-50-50-10, tanh,
W ~ N(0,1)/sqrt(fan_in) drawn by ``models.mlp_init`` from ``PRNGKey(seed)``, b = 0; T steps,
minibatch t = train[(t·200) mod 10000 : +200]; training loss = mean cross-entropy
+ Σ_l exp(log_l2_l)·||W_l||²; per-step, per-layer learning rate (0.5) and momentum (0.9) with
v = μv + (1−μ)g, w = w − ηv; per-layer log L2 (−8): 4 + 8T hyperparameters; objective: the
validation cross-entropy at w_T.

Every benchmark builds B1 here, ours and the peers alike: :func:`arrays` draws the data, w_0 and
λ as numpy arrays (a ``peers.common.B1Problem``, which :func:`write` saves to the .npz that every
implementation reads) and :func:`build` turns them into our dynamics, objective and λ.

    python -m benchmarks.b1 --write b1.npz [--steps 100] [--dtype float64]    # the shared .npz
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import hypergradient as hg
from benchmarks.peers import common
from hypergradient.apps import datasets, models  # the applications package: imported here only

HIDDEN = (50, 50, 50)
BATCH_SIZE = 200
LOG_L2, LR, MOMENTUM = -8.0, 0.5, 0.9

#: The method names of ``hypergradient.apps.methods`` that the benchmarks measure on B1.
METHODS = ("reverse", "checkpoint", "truncated", "forward", "reversible", "drmad")


def load_data(n_train=10000, n_val=10000) -> datasets.Splits:
    """Fashion-MNIST if installed, else scikit-learn's digits (with a message)."""
    try:
        return datasets.load("fashion-mnist", n_train=n_train, n_val=n_val, n_test=1)
    except FileNotFoundError as e:
        print(f"B1: Fashion-MNIST not found, falling back to digits ({e.args[0].splitlines()[0]}); "
              "install it with `apt-get install dataset-fashion-mnist`", file=sys.stderr)
        return datasets.load("digits")


def arrays(steps=100, batch_size=BATCH_SIZE, seed=0, dtype="float32", data=None) -> common.B1Problem:
    """B1's data, initial weights and λ as numpy arrays in ``dtype``.

    w_0 and λ are made in float32 and then cast, so that a float64 problem starts from the
    float32 one's point.
    """
    d = data or load_data()
    sizes = (d.train.x.shape[1], *HIDDEN, d.n_classes)
    w0 = models.mlp_init(jax.random.PRNGKey(seed), sizes)
    layers = len(w0)
    return common.make_b1(
        d.train.x, d.train.y, d.val.x, d.val.y,
        weights=[(np.asarray(layer["W"]), np.asarray(layer["b"])) for layer in w0],
        log_l2=np.full(layers, LOG_L2, np.float32),
        lr=np.full((steps, layers), LR, np.float32),
        momentum=np.full((steps, layers), MOMENTUM, np.float32),
        batch_size=batch_size,
        dtype=dtype,
    )


def _train_loss(w, lam, batch):
    x, y = batch
    return models.cross_entropy(models.mlp_apply(w, x), y) + models.l2_penalty(w, jnp.exp(lam["log_l2"]))


def _per_step_per_layer(lam, t):
    return {"lr": list(lam["lr"][t]), "momentum": list(lam["momentum"][t])}


def _validation_loss(x, y, w, lam):
    return models.cross_entropy(models.mlp_apply(w, x), y)


def build(problem: common.B1Problem, mesh=None):
    """Our ``(dyn, objective, λ)`` for these arrays (in their dtype: float64 needs x64 on); with a
    ``mesh``, the training and validation examples spread over its ``"data"`` axis."""
    labels = lambda y: jnp.asarray(y.astype(np.int32))  # noqa: E731
    dyn = hg.Dynamics(
        init=[{"W": jnp.asarray(W), "b": jnp.asarray(b)} for W, b in problem.weights],
        loss=_train_loss,
        optimizer=hg.optim.momentum(dampen=True),
        optimizer_hparams=_per_step_per_layer,
        data=hg.Batches((jnp.asarray(problem.x_train), labels(problem.y_train)), problem.batch_size, mesh=mesh),
        steps=problem.T,
    )
    val = (jnp.asarray(problem.x_val), labels(problem.y_val))
    objective = jax.tree_util.Partial(_validation_loss, *(val if mesh is None else hg.data.shard(val, mesh)))
    lam = {k: jnp.asarray(v) for k, v in problem.hparams().items()}
    return dyn, objective, lam


def problem(steps=100, seed=0, dtype="float32", data=None):
    """B1's ``(dyn, objective, λ)`` (float64 needs x64 on)."""
    return build(arrays(steps=steps, seed=seed, dtype=dtype, data=data))


# ---------------------------------------------------------------- which λ


def _learning_rates_only(dyn, lam, free, lr_at):
    """The same run with ``free`` as its only hyperparameters: the learning rates of step t are
    ``lr_at(free, t)``; log L2 and the momenta stay at ``lam``'s."""

    def hparams(free, t):
        return {"lr": list(lr_at(free, t)), "momentum": list(lam["momentum"][t])}

    def loss(w, free, batch):
        return dyn.loss(w, lam, batch)

    return hg.Dynamics(dyn.init, loss, dyn.optimizer, hparams, dyn.data, dyn.steps), free


def per_layer_lr(dyn, lam):
    """λ = the 4 per-layer learning rates (m = 4), the same at every step."""
    return _learning_rates_only(dyn, lam, {"lr_layer": lam["lr"][0]}, lambda free, t: free["lr_layer"])


def first_m_lr(dyn, lam, m):
    """λ = the first m entries of the flattened (T, L) learning-rate schedule; the rest fixed."""
    T, L = lam["lr"].shape
    if not 1 <= m <= T * L:
        raise ValueError(f"m = {m} must lie in [1, T·L = {T * L}]")
    rest = lam["lr"].reshape(-1)[m:]

    def lr_at(free, t):
        return jnp.concatenate([free["lr_first"], rest]).reshape(T, L)[t]

    return _learning_rates_only(dyn, lam, {"lr_first": lam["lr"].reshape(-1)[:m]}, lr_at)


#: Which λ a run differentiates: ``HPARAMS[name](dyn, lam, m) -> (dyn, lam)``.
HPARAMS = {
    "all": lambda dyn, lam, m=None: (dyn, lam),
    "per-layer-lr": lambda dyn, lam, m=None: per_layer_lr(dyn, lam),
    "first-m-lr": first_m_lr,
}


def measured_on(method: str) -> str:
    """The λ a method is measured on by default: Forward's cost grows with m, so on the 4 per-layer
    learning rates; every other method on all 4 + 8T hyperparameters."""
    return "per-layer-lr" if method == "forward" else "all"


# ---------------------------------------------------------------- the shared file


def write(path, steps=100, seed=0, dtype="float32") -> dict:
    """Save B1's arrays to ``path`` (``common.save_problem``); returns what the tables print of it."""
    data = load_data()
    p = arrays(steps=steps, seed=seed, dtype=dtype, data=data)
    common.save_problem(path, p)
    return {
        "data": data.name,
        "n_train": int(p.x_train.shape[0]),
        "n_val": int(p.x_val.shape[0]),
        "layer_sizes": [int(p.weights[0][0].shape[0])] + [int(W.shape[1]) for W, _ in p.weights],
        "T": steps,
        "batch_size": p.batch_size,
        "dtype": dtype,
        "log_l2": float(p.log_l2[0]),
        "lr": float(p.lr[0, 0]),
        "momentum": round(float(p.momentum[0, 0]), 6),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", required=True, help="the .npz to write")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = ap.parse_args(argv)
    print(json.dumps(write(args.write, args.steps, args.seed, args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
