"""When the exact hypergradient stops meaning anything: ``hg.smoothness`` on digits, relu against SiLU.

Each problem is trained by Adam on 500 digits (batch 32) in float64, λ = log learning rate
(lr 0.01), objective the cross-entropy on 300 held-out digits:

- ``mlp-relu``, ``mlp-silu``: a 64-32-10 MLP, T = 100 (the case of ``tests/test_smoothness.py``);
- ``cnn-relu``: one 3x3 convolution of 4 channels, relu, 2x2 max pooling, a dense layer;
- ``cnn-silu``: the same with SiLU and 2x2 average pooling (the smooth model of
  ``apps/models.cnn_apply``), both at T = 100 and 300.

For each: the exact ∂f along −g/‖g‖ (Reverse), the central-difference slopes over steps of
1e-5 .. 1e-1 of ‖λ‖, the backward growth and the verdict.

    python -m benchmarks.smoothness [--out benchmarks/results/smoothness.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import hypergradient as hg  # noqa: E402


def cross_entropy(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def problem(model: str, activation: str, steps: int):
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16.0), jnp.asarray(y)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    act = getattr(jax.nn, activation)
    if model == "mlp":
        w0 = [{"W": jax.random.normal(k1, (64, 32)) / 8, "b": jnp.zeros(32)},
              {"W": jax.random.normal(k2, (32, 10)) / math.sqrt(32), "b": jnp.zeros(10)}]

        def apply(w, x):
            return act(x @ w[0]["W"] + w[0]["b"]) @ w[1]["W"] + w[1]["b"]
    else:
        w0 = [{"W": jax.random.normal(k1, (3, 3, 1, 4)) / 3, "b": jnp.zeros(4)},
              {"W": jax.random.normal(k2, (64, 10)) / 8, "b": jnp.zeros(10)}]
        pool = jnp.max if activation == "relu" else jnp.mean

        def apply(w, x):
            h = jax.lax.conv_general_dilated(x.reshape(-1, 8, 8, 1), w[0]["W"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = pool(act(h + w[0]["b"]).reshape(-1, 4, 2, 4, 2, 4), axis=(2, 4))
            return h.reshape(h.shape[0], -1) @ w[1]["W"] + w[1]["b"]

    dyn = hg.Dynamics(init=w0, loss=lambda w, lam, b: cross_entropy(apply(w, b[0]), b[1]), optimizer=hg.optim.adam(),
                      optimizer_hparams=lambda lam, t: {"lr": jnp.exp(lam["log_lr"])},
                      data=hg.Batches((x[:500], y[:500]), 32, key=k3), steps=steps)
    objective = jax.tree_util.Partial(lambda xv, yv, w, lam: cross_entropy(apply(w, xv), yv), x[500:800], y[500:800])
    return dyn, objective, {"log_lr": jnp.log(jnp.asarray(0.01))}


CASES = [("mlp", "relu", 100), ("mlp", "silu", 100), ("cnn", "relu", 100), ("cnn", "silu", 100),
         ("cnn", "relu", 300), ("cnn", "silu", 300)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    rows = []
    for model, activation, steps in CASES:
        start = time.perf_counter()
        check = hg.smoothness(*problem(model, activation, steps), random_directions=0)
        seconds = time.perf_counter() - start
        name = f"{model}-{activation} T={steps}"
        print(f"== {name} ({seconds:.1f} s)\n{check}\n", flush=True)
        rows.append({"problem": name, "exact": float(check.exact[0]), "scales": list(check.scales),
                     "slopes": [float(s) for s in check.slopes[0]], "backward_growth": check.backward_growth,
                     "ok": check.ok, "reason": check.reason, "seconds": seconds})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
