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
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypergradient as hg
from hypergradient.apps import models

from . import _common as c

NAME = "schedules"
METHODS = ("reverse", "forward", "truncated", "reversible", "drmad")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the schedules experiment (``None``: the paper-scale value for the dataset).

    Attributes:
      dataset, data_dir: which data (``hypergradient.apps.datasets.load``).
      method: how to take the hypergradient, one of :data:`METHODS`.
      hyper_steps: Adam steps on the hyperparameters.
      hyper_lr: Adam's learning rate on the (log / logit) hyperparameters.
      seed: weights, minibatch order.
      n_train, n_val: data sizes (digits: 800 / 500; otherwise 10,000 / 10,000).
      n_test: test size (digits: the remaining 497; otherwise 10,000).
      batch_size: digits 100, otherwise 200 (the paper's).
      steps: training steps T.
      hidden: widths of the hidden layers.
      grid: the constant learning rates of the baseline grid search.
      momentum: the baseline's (and the starting) momentum.
      truncation: K for ``method="truncated"``.
      max_lr: learning rates are kept below this (a box on log_lr) so that a
        large hyper-step cannot make training diverge.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    method: str = "reverse"
    hyper_steps: int | None = None
    hyper_lr: float = 0.05
    seed: int = 0
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    batch_size: int | None = None
    steps: int = 100
    hidden: tuple[int, ...] = (50, 50, 50)
    grid: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
    momentum: float = 0.9
    truncation: int = 20
    max_lr: float = 20.0

    def resolved(self) -> Config:
        """The config with every ``None`` replaced by the dataset's value."""
        return c.fill_defaults(
            self,
            hyper_steps=(100, 100),
            n_train=(800, 10_000),
            n_val=(500, 10_000),
            n_test=(None, 10_000),
            batch_size=(100, 200),
        )


def tiny(dataset: str = "digits") -> Config:
    """A configuration that runs in seconds (for tests)."""
    return Config(
        dataset=dataset, hyper_steps=12, hyper_lr=0.1, n_train=200, n_val=200, n_test=200, batch_size=50,
        steps=20, hidden=(16,), grid=(0.1, 1.0), truncation=5,
    )


def run(config: Config, out_dir, progress: bool | None = None) -> dict:
    """Run the experiment; write config.json, history.csv, result.json and plots to ``out_dir``."""
    config = config.resolved()
    c.check_method(NAME, config.method, METHODS)
    method = c.make_method(config.method, config.truncation)
    out_dir = c.prepare(Path(out_dir), config)
    started = time.perf_counter()

    data = c.load_data(config)
    train, val, test = data.train, data.val, data.test
    sizes = (train.x.shape[1], *config.hidden, data.n_classes)
    layers = len(sizes) - 1
    T = config.steps
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

    dyn = hg.Dynamics(
        init=init,
        loss=loss,
        optimizer=hg.optim.momentum(dampen=True),
        optimizer_hparams=optimizer_hparams,
        data=hg.Batches((jnp.asarray(train.x), jnp.asarray(train.y)), config.batch_size,
                        key=jax.random.fold_in(key, 1)),
        steps=T,
    )

    def constant(lr: float) -> dict:
        f32 = jnp.float32
        return {
            "log_lr": jnp.full((T, layers), np.log(lr), f32),
            "logit_momentum": jnp.full((T, layers), np.log(config.momentum / (1 - config.momentum)), f32),
            "log_init_scale": jnp.zeros(layers, f32),
        }

    def evaluate(lam) -> dict:
        try:
            w = dyn.run(lam)
        except hg.DivergenceError:
            return {"val_loss": float("inf"), "val_error": 1.0, "test_loss": float("inf"), "test_error": 1.0}
        v, te = c.metrics(c.mlp_logits(w, val.x), val.y), c.metrics(c.mlp_logits(w, test.x), test.y)
        return {"val_loss": v["loss"], "val_error": v["error"], "test_loss": te["loss"], "test_error": te["error"]}

    c.say(f"[1/3] grid search over {len(config.grid)} constant learning rates (momentum {config.momentum})")
    grid = {lr: evaluate(constant(lr)) for lr in config.grid}
    best_lr = min(config.grid, key=lambda lr: grid[lr]["val_loss"])
    baseline = grid[best_lr]
    c.say(f"      best constant learning rate {best_lr:g}: validation loss {baseline['val_loss']:.4f}")

    c.say(f"[2/3] {config.hyper_steps} hyper-steps of Adam ({config.method}) on "
          f"{2 * T * layers + layers} hyperparameters")
    lam0 = constant(best_lr)
    constraint = hg.constraints.box(-np.inf, float(np.log(config.max_lr)), on="log_lr")
    lam, history, info = c.tune(
        "optimize", out_dir, dyn, objective, lam0, method=method,
        hyper_optimizer=optax.adam(config.hyper_lr), hyper_steps=config.hyper_steps,
        constraint=constraint, progress=progress,
    )
    learned = evaluate(lam)
    c.say(f"[3/3] validation loss {baseline['val_loss']:.4f} (best constant) -> {learned['val_loss']:.4f} (learned)")

    plots = [_plot_schedules(out_dir, lam0, lam, layers), _plot_curve(out_dir, history, baseline["val_loss"])]
    result = {
        "experiment": NAME,
        "dataset": config.dataset,
        "method": config.method,
        "hyper_steps": int(len(history["value"])),
        "hyperparameters": 2 * T * layers + layers,
        "best_constant_lr": best_lr,
        "val_loss_before": baseline["val_loss"],
        "val_loss_after": learned["val_loss"],
        "val_error_before": baseline["val_error"],
        "val_error_after": learned["val_error"],
        "test_error_before": baseline["test_error"],
        "test_error_after": learned["test_error"],
        "test_loss_before": baseline["test_loss"],
        "test_loss_after": learned["test_loss"],
        "learned_init_scales": np.exp(np.asarray(lam["log_init_scale"])).tolist(),
        "grid": {f"{lr:g}": v for lr, v in grid.items()},
        "seconds": time.perf_counter() - started,
        "plots": plots,
        "selected_hyper_step": info["selected_step"],
        "note": info["note"],
    }
    return c.finish(out_dir, c.history_columns(history), result)


def _plot_schedules(out_dir: Path, lam0, lam, layers: int) -> str:
    plt = c.pyplot()
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
    return c.savefig(fig, out_dir / "schedules.png")


def _plot_curve(out_dir: Path, history, baseline: float) -> str:
    plt = c.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(history["value"], label="learned schedules")
    ax.axhline(baseline, color="gray", ls="--", label="best constant learning rate")
    ax.set(xlabel="hyper-step", ylabel="validation loss", title="hyper-optimization")
    ax.legend()
    return c.savefig(fig, out_dir / "learning_curve.png")
