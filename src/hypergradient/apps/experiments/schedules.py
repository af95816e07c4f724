"""Learning-rate, momentum and init-scale schedules (Maclaurin et al. 2015, §3.1).

A tanh MLP (784-50-50-50-10 on Fashion-MNIST, 64-50-50-50-10 on digits) is
trained for T = 100 steps of momentum SGD in the form of the paper
(v ← μv + (1−μ)g, w ← w − ηv). The hyperparameters are

    log_lr[t, l]          η_{t,l} = exp(log_lr[t, l])          per step, per layer
    logit_momentum[t, l]  μ_{t,l} = sigmoid(logit_momentum)    per step, per layer
    log_init_scale[l]     w_0 = exp(log_init_scale[l]) · w̃_0   per layer

and are tuned by Adam on the validation cross-entropy. The baseline is the
best constant learning rate of a small grid (same T, momentum 0.9), which is
also where the hyper-optimization starts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import hypergradient as hg

from .. import models
from . import plots, runner
from .folder import history_columns
from .scoring import mlp_logits

NAME = "schedules"
METHODS = ("reverse", "forward", "truncated", "reversible", "drmad")


@dataclasses.dataclass(frozen=True)
class Config(runner.Config):
    """Settings of the schedules experiment (the shared fields: :class:`.runner.Config`).

    Attributes:
      batch_size: training minibatch size.
      steps: training steps T.
      hidden: widths of the hidden layers.
      grid: the constant learning rates of the baseline grid search.
      momentum: the baseline's (and the starting) momentum.
      max_lr: learning rates are kept below this (a box on log_lr) so that a
        large hyper-step cannot make training diverge.
    """

    DEFAULTS = {
        "digits": {"n_train": 800, "n_val": 500, "n_test": None, "batch_size": 100},
        "paper": {"n_train": 10_000, "n_val": 10_000, "n_test": 10_000, "batch_size": 200},
    }

    batch_size: int | None = None
    steps: int = 100
    hidden: tuple[int, ...] = (50, 50, 50)
    grid: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
    momentum: float = 0.9
    max_lr: float = 20.0


def tiny(dataset: str = "digits") -> Config:
    """A configuration that runs in seconds (for tests)."""
    return Config(
        dataset=dataset, hyper_steps=12, hyper_lr=0.1, n_train=200, n_val=200, n_test=200, batch_size=50,
        steps=20, hidden=(16,), grid=(0.1, 1.0), truncation=5,
    )


class Schedules(runner.Experiment):
    name, methods = NAME, METHODS

    def __init__(self, config: Config, data):
        super().__init__(config, data)
        train, val = data.train, data.val
        sizes = (train.x.shape[1], *config.hidden, data.n_classes)
        self.layers = len(sizes) - 1
        key = jax.random.PRNGKey(config.seed)
        base = models.mlp_init(jax.random.fold_in(key, 0), sizes)
        xv, yv = jnp.asarray(val.x), jnp.asarray(val.y)

        def init(lam):
            return [{"W": jnp.exp(s) * p["W"], "b": p["b"]} for s, p in zip(lam["log_init_scale"], base)]

        def loss(w, lam, batch):
            x, y = batch
            return models.cross_entropy(models.mlp_apply(w, x), y)

        def optimizer_hparams(lam, t):
            return {
                "lr": list(jnp.exp(lam["log_lr"][t])),
                "momentum": list(jax.nn.sigmoid(lam["logit_momentum"][t])),
            }

        def objective(w, lam):
            return models.cross_entropy(models.mlp_apply(w, xv), yv)

        self.objective, self.logits = objective, mlp_logits
        self.dynamics = hg.Dynamics(
            init=init,
            loss=loss,
            optimizer=hg.optim.momentum(dampen=True),
            optimizer_hparams=optimizer_hparams,
            data=hg.Batches((jnp.asarray(train.x), jnp.asarray(train.y)), config.batch_size,
                            key=jax.random.fold_in(key, 1)),
            steps=config.steps,
        )

    def constant(self, lr: float) -> dict:
        """λ of a constant learning rate ``lr`` and the config's momentum, init scales 1."""
        T, layers, mu, f32 = self.config.steps, self.layers, self.config.momentum, jnp.float32
        return {
            "log_lr": jnp.full((T, layers), np.log(lr), f32),
            "logit_momentum": jnp.full((T, layers), np.log(mu / (1 - mu)), f32),
            "log_init_scale": jnp.zeros(layers, f32),
        }

    def baseline(self) -> tuple[float, dict]:
        """The best constant learning rate of the grid, and every grid point's scores."""
        return runner.grid_search(self.config.grid, lambda lr: self.scores(self.train(self.constant(lr))),
                                  f"constant learning rates (momentum {self.config.momentum})")

    def searches(self, baseline) -> list[runner.Search]:
        best, _ = baseline
        box = hg.constraints.box(-np.inf, float(np.log(self.config.max_lr)), on="log_lr")
        return [runner.Search("optimize", self.constant(best), box)]

    def report(self, out_dir, baseline, tuned, scores) -> runner.Report:
        (best_lr, grid), (t,), (learned,) = baseline, tuned, scores
        before = grid[best_lr]
        runner.detail(f"validation loss {before['val_loss']:.4f} (best constant) -> {learned['val_loss']:.4f} (learned)")
        lam0, lam = self.constant(best_lr), t.hparams
        fields = {
            "hyper_steps": int(len(t.history["value"])),
            "hyperparameters": 2 * self.config.steps * self.layers + self.layers,
            "best_constant_lr": best_lr,
            "val_loss_before": before["val_loss"],
            "val_loss_after": learned["val_loss"],
            "val_error_before": before["val_error"],
            "val_error_after": learned["val_error"],
            "test_error_before": before["test_error"],
            "test_error_after": learned["test_error"],
            "test_loss_before": before["test_loss"],
            "test_loss_after": learned["test_loss"],
            "learned_init_scales": np.exp(np.asarray(lam["log_init_scale"])).tolist(),
            "grid": {f"{lr:g}": v for lr, v in grid.items()},
            **t.selection(),
            "note": t.note,
        }
        figures = [_plot_schedules(out_dir, lam0, lam, self.layers),
                   plots.learning_curve(out_dir, t, before["val_loss"], "learned schedules",
                                        "best constant learning rate")]
        return runner.Report(fields, figures, history_columns(t.history))


def run(config: Config, out_dir, progress: bool | None = None) -> dict:
    """Run the experiment; write config.json, history.csv, result.json and plots to ``out_dir``."""
    return runner.run(Schedules, config, out_dir, progress)


def _plot_schedules(out_dir: Path, lam0, lam, layers: int) -> str:
    plt = plots.pyplot()
    lr = np.exp(np.asarray(lam["log_lr"], np.float64))
    mom = 1 / (1 + np.exp(-np.asarray(lam["logit_momentum"], np.float64)))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colors = plt.cm.viridis(np.linspace(0, 0.9, layers))
    for l in range(layers):
        axes[0].plot(lr[:, l], color=colors[l], label=f"layer {l + 1}")
        axes[1].plot(mom[:, l], color=colors[l], label=f"layer {l + 1}")
    axes[0].axhline(float(np.exp(lam0["log_lr"][0, 0])), color="gray", ls="--", lw=1, label="start (best constant)")
    axes[0].set(title="learning rate schedule", xlabel="training step", yscale="log")
    axes[1].axhline(float(1 / (1 + np.exp(-lam0["logit_momentum"][0, 0]))), color="gray", ls="--", lw=1)
    axes[1].set(title="momentum schedule", xlabel="training step", ylim=(0, 1))
    x = np.arange(layers)
    axes[2].bar(x - 0.2, np.exp(np.asarray(lam0["log_init_scale"])), 0.4, color="lightgray", label="initial")
    axes[2].bar(x + 0.2, np.exp(np.asarray(lam["log_init_scale"])), 0.4, color=colors, label="learned")
    axes[2].set(title="init scale (× N(0,1)/√fan_in)", xticks=x, xticklabels=[f"layer {l + 1}" for l in x])
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    return plots.savefig(fig, out_dir / "schedules.png")
