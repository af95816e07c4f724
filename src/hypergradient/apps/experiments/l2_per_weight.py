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
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import hypergradient as hg

from .. import models
from . import plots, runner
from .folder import history_columns
from .scoring import linear_logits

NAME = "l2-per-weight"
METHODS = ("reverse", "forward", "truncated", "reversible")


@dataclasses.dataclass(frozen=True)
class Config(runner.Config):
    """Settings of the per-weight L2 experiment (the shared fields: :class:`.runner.Config`).

    ``method="forward"`` costs one tangent per weight; ``reversible`` reverses the heavy-ball steps
    exactly instead of storing them. The training set is small, where regularization matters.
    ``seed`` is unused (full-batch training from zero), kept for the command line's uniformity.

    Attributes:
      steps, lr, momentum: the inner heavy-ball gradient descent.
      grid: the shared L2 strengths of the baseline grid search.
    """

    DEFAULTS = {
        "digits": {"n_train": 150, "n_val": 500, "n_test": None},
        "paper": {"n_train": 1_000, "n_val": 10_000, "n_test": 10_000},
    }

    hyper_lr: float = 0.1
    steps: int = 200
    lr: float = 0.5
    momentum: float = 0.9
    grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)


def tiny(dataset: str = "digits") -> Config:
    return Config(dataset=dataset, hyper_steps=15, hyper_lr=0.2, n_train=100, n_val=200, n_test=300,
                  steps=30, grid=(1e-3, 1e-2), truncation=10)


class L2PerWeight(runner.Experiment):
    name, methods = NAME, METHODS

    def __init__(self, config: Config, data):
        super().__init__(config, data)
        train, val = data.train, data.val
        k, self.n_features = data.n_classes, train.x.shape[1]
        xv, yv = jnp.asarray(val.x), jnp.asarray(val.y)

        def loss(w, lam, batch):
            x, y = batch
            ce = models.cross_entropy(models.softmax_regression_apply(w, x), y)
            return ce + jnp.sum(jnp.exp(lam["log_l2"]) * w[0]["W"] ** 2)

        def objective(w, lam):
            return models.cross_entropy(models.softmax_regression_apply(w, xv), yv)

        self.objective, self.logits = objective, linear_logits
        self.dynamics = hg.Dynamics(
            init=models.softmax_regression_init(self.n_features, k),
            loss=loss,
            optimizer=hg.optim.momentum(),
            optimizer_hparams=lambda lam, t: {"lr": config.lr, "momentum": config.momentum},
            data=(jnp.asarray(train.x), jnp.asarray(train.y)),
            steps=config.steps,
        )

    def shared(self, strength: float) -> dict:
        """λ of one L2 strength for every weight."""
        return {"log_l2": jnp.full((self.n_features, self.data.n_classes), np.log(strength), jnp.float32)}

    def score(self, tuned: runner.Tuned) -> dict:
        return self.scores_and_weights(tuned.params)

    def scores_and_weights(self, params) -> dict:
        """:meth:`scores`, and the weight matrix under ``"weights"`` (for the plot; ``None``: diverged)."""
        return {**self.scores(params), "weights": None if params is None else np.asarray(params[0]["W"])}

    def baseline(self) -> tuple[float, dict]:
        """The best shared strength of the grid, and every grid point's scores (with its weights)."""
        return runner.grid_search(self.config.grid, lambda s: self.scores_and_weights(self.train(self.shared(s))),
                                  f"shared L2 strengths ({len(self.data.train.x)} training examples)")

    def searches(self, baseline) -> list[runner.Search]:
        best, _ = baseline
        return [runner.Search("optimize", self.shared(best))]

    def report(self, out_dir, baseline, tuned, scores) -> runner.Report:
        (best, grid), (t,), (learned,) = baseline, tuned, scores
        shared = grid[best]
        runner.detail(f"validation loss {shared['val_loss']:.4f} (shared) -> {learned['val_loss']:.4f} (per weight)")
        strengths = np.exp(np.asarray(t.hparams["log_l2"], np.float64))
        np.save(out_dir / "l2_strengths.npy", strengths)
        fields = {
            "hyper_steps": int(len(t.history["value"])),
            "hyperparameters": int(strengths.size),
            "best_shared_l2": best,
            "val_loss_shared": shared["val_loss"],
            "val_loss_per_weight": learned["val_loss"],
            "val_error_shared": shared["val_error"],
            "val_error_per_weight": learned["val_error"],
            "test_error_shared": shared["test_error"],
            "test_error_per_weight": learned["test_error"],
            "test_loss_shared": shared["test_loss"],
            "test_loss_per_weight": learned["test_loss"],
            "l2_min": float(strengths.min()),
            "l2_median": float(np.median(strengths)),
            "l2_max": float(strengths.max()),
            "grid": {f"{s:g}": {m: v for m, v in r.items() if m != "weights"} for s, r in grid.items()},
            **t.selection(),
            "note": t.note,
        }
        figures = [_plot(out_dir, self.data, strengths, learned["weights"], shared["weights"]),
                   plots.learning_curve(out_dir, t, shared["val_loss"], "per-weight L2", "best shared L2")]
        return runner.Report(fields, figures, history_columns(t.history), arrays=["l2_strengths.npy"])


def run(config: Config, out_dir, progress: bool | None = None) -> dict:
    """Run the experiment; write config.json, history.csv, result.json and plots to ``out_dir``."""
    return runner.run(L2PerWeight, config, out_dir, progress)


def _plot(out_dir: Path, data, strengths, weights, baseline_weights) -> str:
    plt = plots.pyplot()
    from matplotlib.colors import LogNorm

    k = strengths.shape[1]
    names = plots.class_names(data.name, k)
    fig, axes = plt.subplots(3, k, figsize=(1.3 * k + 0.8, 4.6))
    norm = LogNorm(vmin=max(strengths.min(), 1e-12), vmax=strengths.max())
    for j in range(k):
        im = axes[0, j].imshow(strengths[:, j].reshape(data.image_shape), cmap="magma", norm=norm)
        axes[0, j].set_title(names[j] + ("\nL2 strength" if j == 0 else ""), fontsize=8)
    plots.image_grid(axes[1], weights.T, ["weights (learned L2)"] + [""] * (k - 1), data.image_shape,
                 cmap="RdBu", symmetric=True)
    plots.image_grid(axes[2], baseline_weights.T, ["weights (shared L2)"] + [""] * (k - 1), data.image_shape,
                 cmap="RdBu", symmetric=True)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.01)
    fig.savefig(out_dir / "l2_strengths.png", dpi=110)
    plt.close(fig)
    return "l2_strengths.png"
