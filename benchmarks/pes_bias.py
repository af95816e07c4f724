"""PES's headline (Vicol, Metz, Sohl-Dickstein 2021) on Fashion-MNIST: a learning-rate schedule
tuned online over truncated unrolls, where Truncated (TRHO) is biased by its short horizon and the
evolution strategies over the same truncations (PES, NRES) are not.

The problem: an MLP 196-32-10 (tanh) trained by SGD, batch 50, on 2,000 Fashion-MNIST training
images (2x2-average-pooled to 14x14; the library's loader, digits when Fashion-MNIST is not
installed), T = 1,000 steps; the objective is the cross-entropy on the next 1,000 images. Two
hyperparameters set the schedule

    η_t = exp(log_lr) · exp(−exp(log_decay) · t / T)

(log_lr the initial learning rate, exp(log_decay) the number of e-foldings over the run). Each
method tunes λ by ``hg.online`` every Δ = 20 steps with Adam(0.05), over ``--episodes`` training
runs back to back (each episode a fresh run from the same w_0, starting from the last one's λ):
``hg.Truncated(20)`` (TRHO), ``hg.PES`` and ``hg.NRES`` (σ = 0.3, 4 pairs) and ``hg.Forward()``
(RTHO, the exact hypergradient of the objective at each segment's end with λ held over the
whole past). The final λ of each (and the untuned λ_0) is scored by a fresh T-step run (the meta-objective f(λ)); the
landscape of f is one vmapped batch of runs on a grid of λ.

    python -m benchmarks.pes_bias [--seeds 2] [--episodes 4] [--steps 1000]

writes ``benchmarks/results/pes_bias.json`` and ``docs/img/pes_bias.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypergradient as hg
from hypergradient.apps import datasets, models

EVERY = 20
LAM0 = {"log_lr": float(np.log(0.03)), "log_decay": 0.0}
GRID_LR = np.linspace(np.log(0.005), np.log(3.0), 13)
GRID_DECAY = np.linspace(np.log(0.05), np.log(20.0), 11)


def load(n_train=2000, n_val=1000):
    """Fashion-MNIST pooled to 14x14 (digits, with a message, when it is not installed)."""
    try:
        d = datasets.load("fashion-mnist", n_train=n_train, n_val=n_val, n_test=1)
        pool = lambda x: x.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(-1, 196)  # noqa: E731
        return (pool(d.train.x), d.train.y), (pool(d.val.x), d.val.y), "fashion-mnist"
    except FileNotFoundError:
        print("pes_bias: Fashion-MNIST not found, using digits", file=sys.stderr)
        d = datasets.load("digits")
        return (d.train.x, d.train.y), (d.val.x, d.val.y), "digits"


def schedule(lam, t, steps):
    return {"lr": jnp.exp(lam["log_lr"] - jnp.exp(lam["log_decay"]) * t / steps)}


def _loss(w, lam, batch):
    return models.cross_entropy(models.mlp_apply(w, batch[0]), batch[1])


def _validation(x, y, w, lam):
    return models.cross_entropy(models.mlp_apply(w, x), y)


def problem(train, val, steps, seed):
    x, y = (jnp.asarray(a) for a in train)
    dyn = hg.Dynamics(
        init=models.mlp_init(jax.random.PRNGKey(seed), (x.shape[1], 32, 10)),
        loss=_loss,
        optimizer=hg.optim.sgd(),
        optimizer_hparams=lambda lam, t: schedule(lam, t, steps),
        data=hg.Batches((x, y), 50, key=jax.random.PRNGKey(100 + seed)),
        steps=steps,
    )
    objective = jax.tree_util.Partial(_validation, *(jnp.asarray(a) for a in val))
    return dyn, objective


def meta_objective(dyn, objective, lams):
    """f(λ) = the validation loss after a fresh T-step run, for a batch of λ (one vmapped program)."""

    @jax.jit
    def f(lams):
        def one(lam):
            state, _ = dyn.rollout(dyn.initial_state(lam), lam, 0, dyn.steps)
            return objective(state.params, lam)

        return jax.vmap(one)(lams)

    return np.asarray(f(lams))


def methods(seed):
    return {
        "TRHO (Truncated(20))": hg.Truncated(EVERY),
        "PES": hg.PES(sigma=0.3, pairs=4, key=seed),
        "NRES": hg.NRES(sigma=0.3, pairs=4, key=seed),
        "RTHO (Forward)": hg.Forward(),
    }


def tune(dyn, objective, method, episodes):
    lam = {k: jnp.asarray(v, jnp.float32) for k, v in LAM0.items()}
    path = [[LAM0["log_lr"], LAM0["log_decay"]]]
    start = time.perf_counter()
    for _ in range(episodes):
        res = hg.online(dyn, objective, lam, method=method, every=EVERY, hyper_optimizer=optax.adam(0.05),
                        progress=False)
        lam = res.hparams
        h = res.history["hparams"]
        path += np.stack([np.asarray(h["log_lr"]), np.asarray(h["log_decay"])], axis=1)[1:].tolist()
        path.append([float(lam["log_lr"]), float(lam["log_decay"])])
    return lam, path, time.perf_counter() - start


def plot(grid, runs, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    values = np.clip(grid, None, np.nanmin(grid) + 1.5)
    cs = ax.contourf(GRID_LR, GRID_DECAY, values.T, levels=20, cmap="viridis")
    fig.colorbar(cs, label="validation loss after T steps (clipped)")
    colors = {"TRHO (Truncated(20))": "tab:red", "PES": "white", "NRES": "tab:orange", "RTHO (Forward)": "tab:cyan"}
    for name in colors:
        for i, r in enumerate(x for x in runs if x["method"] == name):
            p = np.asarray(r["path"])
            ax.plot(p[:, 0], p[:, 1], color=colors[name], lw=1.2, label=name if i == 0 else None)
            ax.plot(p[-1, 0], p[-1, 1], "o", color=colors[name], ms=4)
    ax.plot(LAM0["log_lr"], LAM0["log_decay"], "k*", ms=10, label="start")
    ax.set_xlabel("log initial learning rate")
    ax.set_ylabel("log decay rate (e-foldings over the run)")
    ax.set_xlim(GRID_LR[0], GRID_LR[-1])
    ax.set_ylim(GRID_DECAY[0], GRID_DECAY[-1])
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Learning-rate schedule tuned online, Δ = 20")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results/pes_bias.json")
    parser.add_argument("--figure", default="docs/img/pes_bias.png")
    args = parser.parse_args()
    train, val, name = load()
    runs, grid = [], None
    for seed in range(args.seeds):
        dyn, objective = problem(train, val, args.steps, seed)
        if seed == 0:
            a, b = np.meshgrid(GRID_LR, GRID_DECAY, indexing="ij")
            lams = {"log_lr": jnp.asarray(a.ravel(), jnp.float32), "log_decay": jnp.asarray(b.ravel(), jnp.float32)}
            start = time.perf_counter()
            grid = meta_objective(dyn, objective, lams).reshape(a.shape)
            print(f"landscape: {grid.size} runs in {time.perf_counter() - start:.1f} s; best "
                  f"{np.nanmin(grid):.4f} at log_lr={a.ravel()[np.nanargmin(grid)]:.2f}, "
                  f"log_decay={b.ravel()[np.nanargmin(grid)]:.2f}", flush=True)
        lam0 = {k: jnp.asarray([v], jnp.float32) for k, v in LAM0.items()}
        untuned = float(meta_objective(dyn, objective, lam0)[0])
        runs.append({"method": "untuned λ_0", "seed": seed, **LAM0, "final_val_loss": untuned, "seconds": 0.0,
                     "path": [[LAM0["log_lr"], LAM0["log_decay"]]]})
        print(f"seed {seed} untuned λ_0 f(λ_0)={untuned:.4f}", flush=True)
        for label, method in methods(seed).items():
            lam, path, seconds = tune(dyn, objective, method, args.episodes)
            final = float(meta_objective(dyn, objective, jax.tree.map(lambda x: x[None], lam))[0])
            runs.append({"method": label, "seed": seed, "log_lr": float(lam["log_lr"]),
                         "log_decay": float(lam["log_decay"]), "final_val_loss": final, "seconds": seconds,
                         "path": path})
            print(f"seed {seed} {label:22s} log_lr={lam['log_lr']:+.3f} (lr {np.exp(lam['log_lr']):.3f}) "
                  f"log_decay={lam['log_decay']:+.3f}  f(λ)={final:.4f}  {seconds:.1f} s", flush=True)
    result = {"dataset": name, "steps": args.steps, "every": EVERY, "episodes": args.episodes, "lam0": LAM0,
              "grid": {"log_lr": GRID_LR.tolist(), "log_decay": GRID_DECAY.tolist(), "value": grid.tolist()},
              "runs": runs, "command": "python -m benchmarks.pes_bias " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(grid, runs, args.figure)
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
