"""One L2 strength per weight (Maclaurin et al. 2015, §3.2).

Softmax regression (784×10 weights on Fashion-MNIST, 64×10 on digits) is
trained by T steps of full-batch heavy-ball gradient descent on

    L(w) = CE(w) + Σ_ij exp(log_l2[i, j]) · W_ij²

with one hyperparameter per input weight (7,840 on Fashion-MNIST). They
start at the best *shared* strength of a small grid (the baseline) and are
tuned by Adam on the validation cross-entropy. The learned strengths,
seen as one image per class, show which pixels the model is allowed to use.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax

import hypergradient as hg
from hypergradient.apps import models

from . import _common as c

NAME = "l2-per-weight"
METHODS = ("reverse", "forward", "truncated")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the per-weight L2 experiment (``None``: the dataset's value).

    Attributes:
      dataset, data_dir: which data.
      method: one of :data:`METHODS` (``forward`` costs one tangent per weight).
      hyper_steps: Adam steps on the strengths.
      hyper_lr: Adam's learning rate on log_l2.
      seed: unused by the inner training (full batch from zero); kept for
        the command line's uniformity.
      n_train, n_val, n_test: digits 150 / 500 / the rest; otherwise
        1,000 / 10,000 / 10,000 (a small training set, where regularization
        matters).
      steps, lr, momentum: the inner heavy-ball gradient descent.
      grid: the shared L2 strengths of the baseline grid search.
      truncation: K for ``method="truncated"``.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    method: str = "reverse"
    hyper_steps: int | None = None
    hyper_lr: float = 0.1
    seed: int = 0
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    steps: int = 200
    lr: float = 0.5
    momentum: float = 0.9
    grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)
    truncation: int = 20

    def resolved(self) -> Config:
        return c.fill_defaults(
            self,
            hyper_steps=(100, 100),
            n_train=(150, 1_000),
            n_val=(500, 10_000),
            n_test=(None, 10_000),
        )


def tiny(dataset: str = "digits") -> Config:
    return Config(dataset=dataset, hyper_steps=15, hyper_lr=0.2, n_train=100, n_val=200, n_test=300,
                  steps=30, grid=(1e-3, 1e-2), truncation=10)


def run(config: Config, out_dir, progress: bool | None = None) -> dict:
    config = config.resolved()
    c.check_method(NAME, config.method, METHODS)
    method = c.make_method(config.method, config.truncation)
    out_dir = c.prepare(Path(out_dir), config)
    started = time.perf_counter()

    data = c.load_data(config)
    train, val, test = data.train, data.val, data.test
    k, n_features = data.n_classes, train.x.shape[1]
    xv, yv = jnp.asarray(val.x), jnp.asarray(val.y)

    def loss(w, lam, batch):
        x, y = batch
        ce = models.cross_entropy(models.softmax_regression_apply(w, x), y)
        return ce + jnp.sum(jnp.exp(lam["log_l2"]) * w[0]["W"] ** 2)

    def objective(w, lam):
        return models.cross_entropy(models.softmax_regression_apply(w, xv), yv)

    dyn = hg.Dynamics(
        init=models.softmax_regression_init(n_features, k),
        loss=loss,
        optimizer=hg.optim.momentum(),
        optimizer_hparams=lambda lam, t: {"lr": config.lr, "momentum": config.momentum},
        data=(jnp.asarray(train.x), jnp.asarray(train.y)),
        steps=config.steps,
    )

    def shared(strength: float) -> dict:
        return {"log_l2": jnp.full((n_features, k), np.log(strength), jnp.float32)}

    def scores(lam) -> dict:
        w = dyn.run(lam)
        v, t = c.metrics(c.linear_logits(w, val.x), val.y), c.metrics(c.linear_logits(w, test.x), test.y)
        return {"val_loss": v["loss"], "val_error": v["error"], "test_loss": t["loss"], "test_error": t["error"],
                "weights": np.asarray(w[0]["W"])}

    c.say(f"[1/2] grid search over {len(config.grid)} shared L2 strengths ({len(train.x)} training examples)")
    grid = {s: scores(shared(s)) for s in config.grid}
    best = min(config.grid, key=lambda s: grid[s]["val_loss"])
    baseline = grid[best]
    c.say(f"      best shared strength {best:g}: validation loss {baseline['val_loss']:.4f}")

    c.say(f"[2/2] {config.hyper_steps} hyper-steps of Adam ({config.method}) on {n_features}×{k} strengths")
    lam, history, info = c.tune(
        "optimize", out_dir, dyn, objective, shared(best), method=method,
        hyper_optimizer=optax.adam(config.hyper_lr), hyper_steps=config.hyper_steps, progress=progress,
    )
    learned = scores(lam)
    c.say(f"      validation loss {baseline['val_loss']:.4f} (shared) -> {learned['val_loss']:.4f} (per weight)")

    strengths = np.exp(np.asarray(lam["log_l2"], np.float64))
    np.save(out_dir / "l2_strengths.npy", strengths)
    plots = [_plot(out_dir, data, strengths, learned["weights"], baseline["weights"]),
             _plot_curve(out_dir, history, baseline["val_loss"])]
    result = {
        "experiment": NAME,
        "dataset": config.dataset,
        "method": config.method,
        "hyper_steps": int(len(history["value"])),
        "hyperparameters": int(strengths.size),
        "best_shared_l2": best,
        "val_loss_shared": baseline["val_loss"],
        "val_loss_per_weight": learned["val_loss"],
        "val_error_shared": baseline["val_error"],
        "val_error_per_weight": learned["val_error"],
        "test_error_shared": baseline["test_error"],
        "test_error_per_weight": learned["test_error"],
        "test_loss_shared": baseline["test_loss"],
        "test_loss_per_weight": learned["test_loss"],
        "l2_min": float(strengths.min()),
        "l2_median": float(np.median(strengths)),
        "l2_max": float(strengths.max()),
        "grid": {f"{s:g}": {m: v for m, v in r.items() if m != "weights"} for s, r in grid.items()},
        "seconds": time.perf_counter() - started,
        "plots": plots,
        "selected_hyper_step": info["selected_step"],
        "note": info["note"],
    }
    return c.finish(out_dir, c.history_columns(history), result)


def _plot(out_dir: Path, data, strengths, weights, baseline_weights) -> str:
    plt = c.pyplot()
    from matplotlib.colors import LogNorm

    k = strengths.shape[1]
    names = c.class_names(data.name, k)
    fig, axes = plt.subplots(3, k, figsize=(1.3 * k + 0.8, 4.6))
    norm = LogNorm(vmin=max(strengths.min(), 1e-12), vmax=strengths.max())
    for j in range(k):
        im = axes[0, j].imshow(strengths[:, j].reshape(data.image_shape), cmap="magma", norm=norm)
        axes[0, j].set_title(names[j] + ("\nL2 strength" if j == 0 else ""), fontsize=8)
    c.image_grid(axes[1], weights.T, ["weights (learned L2)"] + [""] * (k - 1), data.image_shape,
                 cmap="RdBu", symmetric=True)
    c.image_grid(axes[2], baseline_weights.T, ["weights (shared L2)"] + [""] * (k - 1), data.image_shape,
                 cmap="RdBu", symmetric=True)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.01)
    fig.savefig(out_dir / "l2_strengths.png", dpi=110)
    plt.close(fig)
    return "l2_strengths.png"


def _plot_curve(out_dir: Path, history, baseline: float) -> str:
    plt = c.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(history["value"], label="per-weight L2")
    ax.axhline(baseline, color="gray", ls="--", label="best shared L2")
    ax.set(xlabel="hyper-step", ylabel="validation loss", title="hyper-optimization")
    ax.legend()
    return c.savefig(fig, out_dir / "learning_curve.png")
