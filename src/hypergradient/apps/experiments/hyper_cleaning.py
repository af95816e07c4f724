"""Data hyper-cleaning (Franceschi, Donini, Frasconi, Pontil, ICML 2017, §5.1).

Half of the training labels are flipped to a wrong class. Softmax regression
is trained by full-batch gradient descent on the weighted loss

    L(w, λ) = (1/n) Σ_i λ_i ℓ(w; x_i, ỹ_i),    0 ≤ λ_i ≤ 1,   Σ_i λ_i ≤ R,

and λ (one weight per training example) is tuned by projected hypergradient
descent on the validation cross-entropy, the projection being
``hg.constraints.box_l1(0, 1, R)``. The examples whose weight ends small
(λ_i ≤ ``flag_threshold``) are flagged as mislabelled.

Compared: Oracle (trained on the clean half only), Baseline (all examples,
λ = 1) and hyper-cleaning for each R. On digits everything is scaled down
in proportion: 5,000 / 5,000 / 10,000 examples become 450 / 450 / the rest,
and R ∈ {1000, 1500, 2000, 2500} becomes {0.2, 0.3, 0.4, 0.5} · n_train.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import hypergradient as hg

from .. import datasets, models
from . import plots, runner
from .scoring import linear_logits

NAME = "hyper-cleaning"
METHODS = ("reverse", "forward", "truncated")


@dataclasses.dataclass(frozen=True)
class Config(runner.Config):
    """Settings of the hyper-cleaning experiment (the shared fields: :class:`.runner.Config`).

    ``hyper_steps`` are per value of R; ``seed`` picks the flipped labels; ``hyper_lr`` acts on λ,
    which lives in [0, 1]. On digits the paper's 5,000 / 5,000 / 10,000 examples are 450 / 450 /
    the rest (897).

    Attributes:
      flip_fraction: fraction of training labels flipped.
      radius_fractions: R / n_train for each R (the paper's {1000, ..., 2500} / 5000).
      steps: full-batch gradient steps T of the inner training.
      lr, momentum: the inner heavy-ball optimizer.
      flag_threshold: λ_i at or below this flags example i as mislabelled.
    """

    DEFAULTS = {
        "digits": {"n_train": 450, "n_val": 450, "n_test": None, "lr": 0.5},
        "paper": {"n_train": 5_000, "n_val": 5_000, "n_test": 10_000, "lr": 0.1},
    }

    flip_fraction: float = 0.5
    radius_fractions: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)
    steps: int = 100
    lr: float | None = None
    momentum: float = 0.9
    flag_threshold: float = 0.1

    def radii(self) -> list[float]:
        return [round(f * self.n_train) for f in self.radius_fractions]


def tiny(dataset: str = "digits") -> Config:
    return Config(dataset=dataset, hyper_steps=25, hyper_lr=0.1, n_train=200, n_val=200, n_test=300,
                  radius_fractions=(0.5,), steps=40, truncation=10)


class HyperCleaning(runner.Experiment):
    name, methods = NAME, METHODS

    def __init__(self, config: Config, data):
        super().__init__(config, data)
        train, val = data.train, data.val
        self.n, n_features = train.x.shape
        y_noisy, self.flipped = datasets.flip_labels(train.y, config.flip_fraction, data.n_classes, seed=config.seed)
        self.radii = {f"R={radius}": radius for radius in config.radii()}  # checkpoint label -> R
        xv, yv = jnp.asarray(val.x), jnp.asarray(val.y)

        def loss(w, lam, batch):
            x, y = batch
            return models.cross_entropy(models.softmax_regression_apply(w, x), y, weights=lam["weights"])

        def objective(w, lam):
            return models.cross_entropy(models.softmax_regression_apply(w, xv), yv)

        self.objective, self.logits = objective, linear_logits
        self.dynamics = hg.Dynamics(
            init=models.softmax_regression_init(n_features, data.n_classes),
            loss=loss,
            optimizer=hg.optim.momentum(),
            optimizer_hparams=lambda lam, t: {"lr": config.lr, "momentum": config.momentum},
            data=(jnp.asarray(train.x), jnp.asarray(y_noisy)),
            steps=config.steps,
        )

    def test_accuracy(self, weights) -> float:
        return 1.0 - self.scores(self.train({"weights": jnp.asarray(weights, jnp.float32)}))["test_error"]

    def baseline(self) -> tuple[float, float]:
        """Test accuracy of the Oracle (trained on the clean examples only) and of the Baseline (on all)."""
        n, flipped = self.n, self.flipped
        runner.detail(f"{n} training examples, {int(flipped.sum())} flipped; training Oracle and Baseline")
        clean = (~flipped).astype(np.float32)
        # The oracle is trained on the mean loss over the clean examples only.
        oracle = self.test_accuracy(clean * n / clean.sum())
        baseline = self.test_accuracy(np.ones(n, np.float32))
        runner.detail(f"test accuracy: Oracle {oracle:.4f}, Baseline {baseline:.4f}")
        return oracle, baseline

    def searches(self, baseline) -> list[runner.Search]:
        return [runner.Search(label, {"weights": jnp.full(self.n, min(1.0, radius / self.n), jnp.float32)},
                              hg.constraints.box_l1(0.0, 1.0, float(radius)))
                for label, radius in self.radii.items()]

    def score(self, tuned: runner.Tuned) -> dict:
        weights = np.asarray(tuned.hparams["weights"])
        flagged, flipped = weights <= self.config.flag_threshold, self.flipped
        params, history = tuned.params, tuned.history
        row = {
            "R": self.radii[tuned.label],
            "test_accuracy": 1.0 - self.scores(params)["test_error"],
            "f1": _f1(flagged, flipped),
            "precision": _precision(flagged, flipped),
            "recall": _recall(flagged, flipped),
            "flagged": int(flagged.sum()),
            "val_loss_before": float(history["value"][0]) if len(history["value"]) else float("nan"),
            "val_loss_after": float("inf") if params is None else float(self.objective(params, tuned.hparams)),
            **tuned.selection(),
            "note": tuned.note,
        }
        runner.detail(f"R = {row['R']}: test accuracy {row['test_accuracy']:.4f}, F1 {row['f1']:.3f} "
                      f"({row['flagged']} flagged)")
        return row

    def report(self, out_dir, baseline, tuned, scores) -> runner.Report:
        oracle, base = baseline
        # R is chosen on the validation loss, as a hyperparameter should be.
        best = min(scores, key=lambda r: r["val_loss_after"])
        curves = {row["R"]: t for row, t in zip(scores, tuned)}
        columns = {"hyper_step": list(range(max(len(t.history["value"]) for t in tuned)))}
        for radius, t in curves.items():
            columns[f"val_loss_R={radius}"] = list(t.history["value"])
        fields = {
            "n_train": self.n,
            "flipped": int(self.flipped.sum()),
            "oracle_test_accuracy": oracle,
            "baseline_test_accuracy": base,
            "best_R": best["R"],  # by validation loss
            "hyper_cleaning_test_accuracy": best["test_accuracy"],
            "hyper_cleaning_f1": best["f1"],
            "per_R": scores,
        }
        return runner.Report(fields, [_plot(out_dir, curves, self.flipped, oracle, base, scores)], columns)


def run(config: Config, out_dir, progress: bool | None = None) -> dict:
    """Run the experiment; write config.json, history.csv, result.json and plots to ``out_dir``."""
    return runner.run(HyperCleaning, config, out_dir, progress)


def _precision(flagged, truth) -> float:
    return float((flagged & truth).sum() / max(flagged.sum(), 1))


def _recall(flagged, truth) -> float:
    return float((flagged & truth).sum() / max(truth.sum(), 1))


def _f1(flagged, truth) -> float:
    p, r = _precision(flagged, truth), _recall(flagged, truth)
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _plot(out_dir: Path, curves, flipped, oracle, baseline, rows) -> str:
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for radius, tuned in curves.items():
        plots.curve(axes[0], tuned, f"R = {radius}")
    axes[0].set(xlabel="hyper-step", ylabel="validation loss", title="hyper-optimization")
    axes[0].legend(fontsize=7)
    radius = min(rows, key=lambda r: r["val_loss_after"])["R"]
    weights = np.asarray(curves[radius].hparams["weights"])
    bins = np.linspace(0, 1, 21)
    axes[1].hist([weights[~flipped], weights[flipped]], bins=bins, label=["clean label", "flipped label"],
                 color=["tab:blue", "tab:red"])
    axes[1].set(xlabel="learned weight λ_i", ylabel="examples", title=f"weights at R = {radius}")
    axes[1].legend(fontsize=7)
    labels = ["Oracle", "Baseline"] + [f"R={r['R']}" for r in rows]
    accs = [oracle, baseline] + [r["test_accuracy"] for r in rows]
    axes[2].bar(range(len(accs)), accs, color=["tab:green", "tab:gray"] + ["tab:blue"] * len(rows))
    axes[2].set(xticks=range(len(accs)), ylabel="test accuracy", title="test accuracy",
                ylim=(max(0.0, min(accs) - 0.1), min(1.0, max(accs) + 0.03)))
    axes[2].set_xticklabels(labels, fontsize=8)
    return plots.savefig(fig, out_dir / "hyper_cleaning.png")
