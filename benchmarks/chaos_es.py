"""The chaotic case: a B1-like run at a large learning rate, where Reverse's hypergradient overflows
(``hg.ChaosWarning``) and ``hg.ES`` still descends.

B1 (``benchmarks/b1.py``: MLP 784-50-50-50-10, tanh, SGD with dampened momentum 0.9, batch 200,
log L2 −8) on a subset of Fashion-MNIST (``--n-train`` 2,000 training and 1,000 validation images),
T = ``--steps`` (400) steps, float32, with one hyperparameter: λ = log learning rate, the same for
every layer and step, starting at lr = ``--lr`` (2.0, four times B1's). The script

1. computes Reverse's hypergradient at λ_0 and reports it, the backward growth and the warning,
   and the verdict of ``hg.smoothness``;
2. scans f(λ) on a grid of log lr around λ_0 (one vmapped batch of runs), to show the trend that
   the exact derivative misses;
3. runs ``hg.optimize`` with ``hg.ES(sigma=0.1, pairs=4)`` and Adam(0.1) for ``--hyper-steps`` (20)
   hyper-steps and reports f(λ_k) at each, and the smoothed objective f_σ(λ) = E f(λ + σz) that ES
   descends, at λ_0 and at ES's final λ (the mean over 32 common draws of z, one vmapped batch, with
   the paired standard error of the difference):
   f itself jumps between neighbouring λ by more than the hyper-steps gain;
4. runs the same hyper-steps with Reverse's hypergradient (Adam normalises its size, so only its
   sign steers), for comparison.

    python -m benchmarks.chaos_es [--steps 400] [--lr 2.0] [--hyper-steps 20]

writes ``benchmarks/results/chaos_es.json`` and ``docs/img/chaos_es.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypergradient as hg
from benchmarks import b1
from hypergradient.apps import datasets

SIGMA = 0.1
SMOOTHING_DRAWS = 32


def problem(steps, lr, n_train):
    """B1 at ``steps`` with λ = {"log_lr": scalar}, the learning rate of every layer and step."""
    try:
        data = datasets.load("fashion-mnist", n_train=n_train, n_val=n_train // 2, n_test=1)
    except FileNotFoundError:
        print("chaos_es: Fashion-MNIST not found, using digits", file=sys.stderr)
        data = datasets.load("digits")
    dyn, objective, lam = b1.problem(steps=steps, data=data)
    dyn, free = b1._learning_rates_only(dyn, lam, {"log_lr": jnp.log(jnp.float32(lr))},
                                        lambda free, t: [jnp.exp(free["log_lr"])] * len(lam["log_l2"]))
    return dyn, objective, free, data.name


def scan(dyn, objective, log_lrs):
    """f at each log lr, one vmapped batch of training runs."""

    @jax.jit
    def f(x):
        def one(v):
            lam = {"log_lr": v}
            state, _ = dyn.rollout(dyn.initial_state(lam), lam, 0, dyn.steps)
            return objective(state.params, lam)

        return jax.vmap(one)(x)

    return np.asarray(f(jnp.asarray(log_lrs, jnp.float32)))


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(np.exp(out["scan"]["log_lr"]), out["scan"]["value"], "o-", color="gray", label="f(lr), grid")
    lrs, values = np.exp(out["es"]["log_lr"]), out["es"]["value"]
    ax.plot(lrs, values, "o-", color="tab:orange", label="hg.ES path (f at each λ_k)")
    ax.plot(lrs[0], values[0], "k*", ms=10, label="start")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation loss after T = {out['steps']}")
    ax.set_title(f"B1-like run, chaotic: Reverse's hypergradient {out['reverse'].get('grad', 'overflows')}"
                 if "grad" not in out["reverse"] else
                 f"B1-like run: Reverse's ∂f/∂log lr = {out['reverse']['grad']:.3g}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--hyper-steps", type=int, default=20)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--out", default="benchmarks/results/chaos_es.json")
    parser.add_argument("--figure", default="docs/img/chaos_es.png")
    args = parser.parse_args()
    dyn, objective, lam0, name = problem(args.steps, args.lr, args.n_train)
    out = {"dataset": name, "steps": args.steps, "lr0": args.lr,
           "command": "python -m benchmarks.chaos_es " + " ".join(sys.argv[1:])}

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            exact = hg.hypergrad(dyn, objective, lam0, method=hg.Reverse())
            out["reverse"] = {"value": float(exact.value), "grad": float(exact.grad["log_lr"]),
                              "backward_growth": float(exact.stats["backward_growth"])}
        except hg.errors.DivergenceError as e:
            out["reverse"] = {"error": str(e).split(";")[0]}
    out["reverse"]["warnings"] = [w.category.__name__ for w in caught]
    out["reverse"]["seconds"] = time.perf_counter() - start
    print("Reverse:", out["reverse"], flush=True)
    check = hg.smoothness(dyn, objective, lam0, random_directions=0)
    out["smoothness_ok"] = bool(check.ok)
    print(check, flush=True)

    grid = np.log(args.lr) + np.linspace(-1.5, 1.0, 11)
    values = scan(dyn, objective, grid)
    out["scan"] = {"log_lr": grid.tolist(), "value": values.tolist()}
    print("f(log lr):", " ".join(f"{np.exp(g):.2f}:{v:.3f}" for g, v in zip(grid, values)), flush=True)

    start = time.perf_counter()
    res = hg.optimize(dyn, objective, lam0, method=hg.ES(sigma=SIGMA, pairs=4, key=0),
                      hyper_optimizer=optax.adam(0.1), hyper_steps=args.hyper_steps, progress=False)
    seconds = time.perf_counter() - start
    path = np.asarray(res.history["hparams"]["log_lr"]).tolist()
    out["es"] = {"value": np.asarray(res.history["value"]).tolist(), "log_lr": path,
                 "final_log_lr": float(res.hparams["log_lr"]), "final_value": float(res.value), "seconds": seconds}
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (SMOOTHING_DRAWS,)))
    before, after = (scan(dyn, objective, x + SIGMA * z) for x in (path[0], out["es"]["final_log_lr"]))
    error = float(np.std(after - before, ddof=1) / np.sqrt(SMOOTHING_DRAWS))
    out["es"]["smoothed"] = {"start": float(before.mean()), "final": float(after.mean()),
                             "difference_standard_error": error, "draws": SMOOTHING_DRAWS}
    print(f"f_σ (mean of f over {SMOOTHING_DRAWS} common draws λ + σz): {before.mean():.4f} at λ_0, "
          f"{after.mean():.4f} at ES's final λ (difference ± {error:.4f})", flush=True)
    print("ES: f(λ_k) =", " ".join(f"{v:.4f}" for v in out["es"]["value"]), f"final {res.value:.4f} at lr "
          f"{np.exp(float(res.hparams['log_lr'])):.3f}, {seconds:.1f} s", flush=True)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = hg.optimize(dyn, objective, lam0, method=hg.Reverse(), hyper_optimizer=optax.adam(0.1),
                              hyper_steps=args.hyper_steps, progress=False)
            final = float(res.hparams["log_lr"])
            after = scan(dyn, objective, final + SIGMA * z)
            out["reverse_adam"] = {"value": np.asarray(res.history["value"]).tolist(), "final_log_lr": final,
                                   "final_value": float(res.value), "smoothed_final": float(after.mean())}
        except hg.errors.HyperDivergenceError as e:
            out["reverse_adam"] = {"error": str(e).split(";")[0]}
    out["reverse_adam"]["chaos_warnings"] = sum(w.category is hg.ChaosWarning for w in caught)
    out["reverse_adam"]["seconds"] = time.perf_counter() - start
    print("Reverse + Adam, the same hyper-steps:", out["reverse_adam"], flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    plot(out, args.figure)
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
