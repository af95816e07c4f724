"""Real-time hyperparameter optimization (Franceschi et al. 2017, §4: RTHO and TRHO).

A small CNN is trained with Adam for T steps. Adam's learning rate and an
L2 strength,

    lr = exp(log_lr),     L(w) = CE(w) + exp(log_l2) · Σ_l ‖W_l‖²,

are tuned *during that one run*: every Δ steps the hypergradient of the
validation loss (on a validation minibatch) updates λ, with

- ``rtho``: the forward tangent Z_t = ∂s_t/∂λ carried along the whole run
  (``hg.online(..., method=hg.Forward(), every=Δ)``);
- ``trho``: reverse mode through the last K steps of each interval
  (``hg.online(..., method=hg.Truncated(K), every=Δ)``).

The baseline is the same run with the initial λ held fixed.
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

NAME = "realtime"
METHODS = ("rtho", "trho")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the real-time experiment (``None``: the dataset's value).

    Attributes:
      dataset, data_dir: which data.
      method: ``rtho`` or ``trho``.
      hyper_steps: number of hyper-updates in the run; the training run has
        ``steps = hyper_steps · every`` steps.
      every: Δ, training steps between hyper-updates.
      truncation: K ≤ Δ for ``trho``.
      hyper_lr: Adam's learning rate on (log_lr, log_l2).
      lr0, l2_0: the initial (and baseline) Adam learning rate and L2 strength.
      seed: weights, minibatch order.
      n_train, n_val, n_test: digits 800 / 500 / the rest; otherwise 10,000 each.
      batch_size, val_batch: training and validation minibatch sizes.
      channels: convolution channels of the CNN.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    method: str = "rtho"
    hyper_steps: int | None = None
    every: int | None = None
    truncation: int | None = None
    hyper_lr: float = 0.1
    lr0: float = 1e-3
    l2_0: float = 1e-3
    seed: int = 0
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    batch_size: int | None = None
    val_batch: int | None = None
    channels: tuple[int, ...] = (8, 16)

    def resolved(self) -> Config:
        config = runner.fill_defaults(self, every=(10, 20))
        return runner.fill_defaults(
            config,
            hyper_steps=(60, 100),
            truncation=(config.every, config.every),
            n_train=(800, 10_000),
            n_val=(500, 10_000),
            n_test=(None, 10_000),
            batch_size=(50, 100),
            val_batch=(500, 1000),
        )


def tiny(dataset: str = "digits") -> Config:
    return Config(dataset=dataset, hyper_steps=20, every=5, hyper_lr=0.2, n_train=200, n_val=200,
                  n_test=200, batch_size=25, val_batch=200, channels=(4,))


class Realtime(runner.Experiment):
    name, methods = NAME, METHODS
    resumable_changes = ("data_dir",)  # the one training run lasts hyper_steps·every steps

    def __init__(self, config: Config, data):
        super().__init__(config, data)
        train, val = data.train, data.val
        shape = data.image_shape
        key = jax.random.PRNGKey(config.seed)
        w0 = models.cnn_init(jax.random.fold_in(key, 0), shape, data.n_classes, channels=config.channels)
        val_batches = hg.Batches((jnp.asarray(val.x), jnp.asarray(val.y)), config.val_batch,
                                 key=jax.random.fold_in(key, 2))

        def loss(w, lam, batch):
            x, y = batch
            penalty = sum(jnp.sum(layer["W"] ** 2) for layer in w)
            return models.cross_entropy(models.cnn_apply(w, x, shape), y) + jnp.exp(lam["log_l2"]) * penalty

        def objective(w, lam, k):
            x, y = val_batches(k)
            return models.cross_entropy(models.cnn_apply(w, x, shape), y)

        self.objective = objective
        self.logits = jax.jit(lambda w, x: models.cnn_apply(w, x, shape))
        self.dynamics = hg.Dynamics(
            init=w0,
            loss=loss,
            optimizer=hg.optim.adam(),
            optimizer_hparams=lambda lam, t: {"lr": jnp.exp(lam["log_lr"])},
            data=hg.Batches((jnp.asarray(train.x), jnp.asarray(train.y)), config.batch_size,
                            key=jax.random.fold_in(key, 1)),
            steps=config.hyper_steps * config.every,
        )
        self.lam0 = {"log_lr": jnp.asarray(np.log(config.lr0), jnp.float32),
                     "log_l2": jnp.asarray(np.log(config.l2_0), jnp.float32)}

    def baseline(self) -> dict:
        """The scores of the run with the initial λ held fixed."""
        config = self.config
        fixed = self.scores(self.train(self.lam0))
        runner.detail(f"{self.dynamics.steps} Adam steps with lr {config.lr0:g}, L2 {config.l2_0:g} held fixed: "
                      f"test error {fixed['test_error']:.4f}")
        return fixed

    def searches(self, baseline) -> list[runner.Search]:
        return [runner.Search("online", self.lam0)]

    def report(self, out_dir, baseline, tuned, scores) -> runner.Report:
        config, fixed, (t,), (online,) = self.config, baseline, tuned, scores
        runner.detail(f"test error {online['test_error']:.4f} (fixed: {fixed['test_error']:.4f})")
        lam, history = t.hparams, t.history
        traj = history.get("hparams", {})
        lr_traj = np.exp(np.asarray(traj.get("log_lr", np.zeros(0)), np.float64))
        l2_traj = np.exp(np.asarray(traj.get("log_l2", np.zeros(0)), np.float64))
        fields = {
            "training_steps": self.dynamics.steps,
            "hyper_updates": int(len(history["value"])),
            "lr_start": config.lr0,
            "lr_end": float(np.exp(lam["log_lr"])),
            "l2_start": config.l2_0,
            "l2_end": float(np.exp(lam["log_l2"])),
            "val_loss_fixed": fixed["val_loss"],
            "val_loss_online": online["val_loss"],
            "test_error_fixed": fixed["test_error"],
            "test_error_online": online["test_error"],
            "test_loss_fixed": fixed["test_loss"],
            "test_loss_online": online["test_loss"],
            "note": t.note,
        }
        columns = history_columns(history, lr=list(lr_traj), l2=list(l2_traj))
        return runner.Report(fields, [_plot(out_dir, config, history, lr_traj, l2_traj)], columns)


def run(config: Config, out_dir, progress: bool | None = None) -> dict:
    """Run the experiment; write config.json, history.csv, result.json and plots to ``out_dir``."""
    return runner.run(Realtime, config, out_dir, progress)


def _plot(out_dir: Path, config: Config, history, lr_traj, l2_traj) -> str:
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    at = np.arange(len(lr_traj)) * config.every
    axes[0].plot(at, lr_traj)
    axes[0].set(xlabel="training step", ylabel="Adam learning rate", yscale="log", title="learning rate")
    axes[1].plot(at, l2_traj, color="tab:orange")
    axes[1].set(xlabel="training step", ylabel="L2 strength", yscale="log", title="L2 strength")
    axes[2].plot(np.arange(len(history["train_loss"])), history["train_loss"], lw=0.5, alpha=0.6, label="train")
    axes[2].plot((np.arange(len(history["value"])) + 1) * config.every, history["value"], label="validation")
    axes[2].set(xlabel="training step", ylabel="loss", yscale="log", title="losses during the run")
    axes[2].legend(fontsize=7)
    return plots.savefig(fig, out_dir / "realtime.png")
