"""Real-time hyperparameter optimization (Franceschi et al. 2017, §4: RTHO and TRHO).

A small CNN is trained with Adam for T steps. Adam's learning rate and an
L2 strength,

    lr = exp(log_lr),     L(w) = CE(w) + exp(log_l2) · Σ_l ‖W_l‖²,

are tuned *during that one run*: every Δ steps the hypergradient of the
validation loss (on a validation minibatch) updates λ, with

- ``rtho``: the forward tangent Z_t = ∂s_t/∂λ carried along the whole run
  (``hg.online(..., method=hg.Forward(), every=Δ)``);
- ``trho``: reverse mode through the last K = 3Δ steps, the interval just run
  and the two before it, whose λ are shifted with the current one
  (``hg.online(..., method=hg.Truncated(K), every=Δ)``);
- ``pes``, ``nres``: evolution strategies over the truncations, 8 antithetic particles trained
  beside the run (``hg.online(..., method=hg.PES(), every=Δ)``, ``hg.NRES()``).

The comparators: ``fixed``, the same run with the initial λ held fixed (every
method's baseline); ``reverse``, the offline tuning of a constant λ, one whole
training run per hyper-step (``hg.optimize`` with ``hg.Reverse()`` on the whole
validation set, keeping the best λ seen); ``es``, the same with ``hg.ES()``. Every method keeps λ in the box
``lr_bounds × l2_bounds``.

The CNN uses SiLU, not relu: relu makes the training step discontinuous in the weights, and an
exact hypergradient of a long run then misses the jumps. ``docs/experiments.md`` (realtime) gives
the measurements behind this and behind the defaults below.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import hypergradient as hg
from hypergradient.errors import ExperimentError

from .. import methods, models
from . import plots, runner
from .folder import history_columns

NAME = "realtime"
METHODS = ("rtho", "trho", "pes", "nres", "reverse", "es")


@dataclasses.dataclass(frozen=True)
class Config(runner.Config):
    """Settings of the real-time experiment (the shared fields: :class:`.runner.Config`).

    ``method``: ``rtho``, ``trho``, ``pes`` or ``nres`` (real time); ``reverse`` (or ``es``): the
    offline comparator, constant λ tuned by ``hg.optimize`` with one whole training run per
    hyper-step. ``hyper_steps``: the
    hyper-updates of the real-time run; every method's training run has ``hyper_steps · every``
    steps. ``truncation``: K for ``trho``, ≤ Δ or a multiple of Δ reaching into the intervals
    before; by default 3Δ. ``hyper_lr`` is every method's (0.3: in real time λ must reach its
    values early in the one run).

    Attributes:
      every: Δ, training steps between hyper-updates.
      offline_hyper_steps: hyper-steps of the offline comparator.
      lr0, l2_0: the initial (and baseline) Adam learning rate and L2 strength.
      lr_bounds, l2_bounds: the box every method keeps λ in (projected after each hyper-step). The
        learning rate's stops below where training turns chaotic: 0.1 on digits, 3e-2 on
        Fashion-MNIST.
      batch_size, val_batch: training and (real time) validation minibatch sizes.
      channels: convolution channels of the CNN.
    """

    DEFAULTS = {
        "digits": {"n_train": 800, "n_val": 500, "n_test": None, "offline_hyper_steps": 40,
                   "lr_bounds": (1e-4, 1e-1), "val_batch": 500},
        "paper": {"n_train": 10_000, "n_val": 10_000, "n_test": 10_000, "offline_hyper_steps": 10,
                  "lr_bounds": (1e-4, 3e-2), "val_batch": 1000},
    }

    method: str = "rtho"
    hyper_steps: int = 60
    hyper_lr: float = 0.3
    truncation: int | None = None
    every: int = 10
    offline_hyper_steps: int | None = None
    lr0: float = 1e-3
    l2_0: float = 1e-3
    lr_bounds: tuple[float, float] | None = None
    l2_bounds: tuple[float, float] = (1e-6, 1e-1)
    batch_size: int = 50
    val_batch: int | None = None
    channels: tuple[int, ...] = (8, 16)

    def resolved(self) -> Config:
        """:meth:`runner.Config.resolved`, and a ``truncation`` left ``None`` set to 3Δ."""
        config = super().resolved()
        return config if config.truncation is not None else dataclasses.replace(config, truncation=3 * config.every)


def tiny(dataset: str = "digits") -> Config:
    return Config(dataset=dataset, hyper_steps=20, every=5, offline_hyper_steps=3, hyper_lr=0.2, n_train=200,
                  n_val=200, n_test=200, batch_size=25, val_batch=200, channels=(4,))


class Realtime(runner.Experiment):
    name, methods = NAME, METHODS
    # the training run lasts hyper_steps·every steps; more offline hyper-steps continue a finished run
    resumable_changes = ("data_dir", "offline_hyper_steps")

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

        def minibatch_objective(w, lam, k):  # real time: the validation minibatch of update k
            x, y = val_batches(k)
            return models.cross_entropy(models.cnn_apply(w, x, shape), y)

        def objective(w, lam):  # offline: the whole validation set
            return models.cross_entropy(models.cnn_apply(w, jnp.asarray(val.x), shape), jnp.asarray(val.y))

        self.realtime = methods.METHODS[config.method].realtime
        self.objective = minibatch_objective if self.realtime else objective
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
        (lr_lo, lr_hi), (l2_lo, l2_hi) = config.lr_bounds, config.l2_bounds
        if not (0 < lr_lo <= config.lr0 <= lr_hi and 0 < l2_lo <= config.l2_0 <= l2_hi):
            raise ExperimentError(f"lr0 {config.lr0:g} and l2_0 {config.l2_0:g} must lie in their bounds "
                                  f"{config.lr_bounds} and {config.l2_bounds}, which must be positive")
        self.box = hg.constraints.chain(hg.constraints.box(float(np.log(lr_lo)), float(np.log(lr_hi)), on="log_lr"),
                                        hg.constraints.box(float(np.log(l2_lo)), float(np.log(l2_hi)), on="log_l2"))

    def baseline(self) -> dict:
        """The scores of the run with the initial λ held fixed, and its wall time."""
        config = self.config
        started = time.perf_counter()
        fixed = self.scores(self.train(self.lam0))
        fixed["seconds"] = time.perf_counter() - started
        runner.detail(f"{self.dynamics.steps} Adam steps with lr {config.lr0:g}, L2 {config.l2_0:g} held fixed: "
                      f"test error {fixed['test_error']:.4f} ({fixed['seconds']:.0f} s)")
        return fixed

    def searches(self, baseline) -> list[runner.Search]:
        if self.realtime:
            return [runner.Search("online", self.lam0, self.box)]
        return [runner.Search("optimize", self.lam0, self.box, self.config.offline_hyper_steps)]

    def report(self, out_dir, baseline, tuned, scores) -> runner.Report:
        config, fixed, (t,), (after,) = self.config, baseline, tuned, scores
        runner.detail(f"test error {after['test_error']:.4f} (fixed: {fixed['test_error']:.4f})")
        lam, history = t.hparams, t.history
        traj = history.get("hparams", {})
        lr_traj = np.exp(np.asarray(traj.get("log_lr", np.zeros(0)), np.float64))
        l2_traj = np.exp(np.asarray(traj.get("log_l2", np.zeros(0)), np.float64))
        fields = {
            "training_steps": self.dynamics.steps,
            "hyper_updates": int(len(history["value"])),
            **({} if self.realtime else t.selection()),
            "lr_start": config.lr0,
            "lr_end": float(np.exp(lam["log_lr"])),
            "l2_start": config.l2_0,
            "l2_end": float(np.exp(lam["log_l2"])),
            "val_loss_fixed": fixed["val_loss"],
            "val_loss_tuned": after["val_loss"],
            "test_error_fixed": fixed["test_error"],
            "test_error_tuned": after["test_error"],
            "test_loss_fixed": fixed["test_loss"],
            "test_loss_tuned": after["test_loss"],
            "seconds_fixed": fixed["seconds"],
            "seconds_tuning": t.seconds,
            "note": t.note,
        }
        columns = history_columns(history, lr=list(lr_traj), l2=list(l2_traj))
        return runner.Report(fields, [_plot(out_dir, config, self.realtime, history, lr_traj, l2_traj)], columns)


def run(config: Config, out_dir, progress: bool | None = None) -> dict:
    """Run the experiment; write config.json, history.csv, result.json and plots to ``out_dir``."""
    return runner.run(Realtime, config, out_dir, progress)


def _plot(out_dir: Path, config: Config, realtime: bool, history, lr_traj, l2_traj) -> str:
    """λ over the run (real time: against the training step) or over the hyper-steps (offline), and the losses."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    at, x_label = (np.arange(len(lr_traj)) * config.every, "training step") if realtime else (
        np.arange(len(lr_traj)), "hyper-step")
    axes[0].plot(at, lr_traj)
    axes[0].set(xlabel=x_label, ylabel="Adam learning rate", yscale="log", title="learning rate")
    axes[1].plot(at, l2_traj, color="tab:orange")
    axes[1].set(xlabel=x_label, ylabel="L2 strength", yscale="log", title="L2 strength")
    if realtime:
        axes[2].plot(np.arange(len(history["train_loss"])), history["train_loss"], lw=0.5, alpha=0.6, label="train")
        axes[2].plot((np.arange(len(history["value"])) + 1) * config.every, history["value"], label="validation")
        axes[2].set(xlabel="training step", ylabel="loss", yscale="log", title="losses during the run")
        axes[2].legend(fontsize=7)
    else:
        axes[2].plot(np.arange(len(history["value"])), history["value"], marker=".")
        axes[2].set(xlabel="hyper-step", ylabel="validation loss at the end of training", yscale="log",
                    title="offline hyper-optimization")
    return plots.savefig(fig, out_dir / "realtime.png")
