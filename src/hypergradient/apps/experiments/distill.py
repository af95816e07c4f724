"""Training the training set (Maclaurin et al. 2015, §3.3): dataset distillation.

Ten synthetic images X (one per class, labels 0..9) are the hyperparameters.
Softmax regression is trained on them alone, from zero, by T steps of
full-batch gradient descent; X is tuned by Adam on the cross-entropy of the
trained model on the real validation set, and kept in the pixel range
[0, 1] by ``hg.constraints.box(0, 1)``. The synthetic images start as ten
random real training images (one per class), which are also the baseline.
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

NAME = "distill"
METHODS = ("reverse", "forward", "truncated")


@dataclasses.dataclass(frozen=True)
class Config(runner.Config):
    """Settings of the distillation experiment (the shared fields: :class:`.runner.Config`).

    ``method="forward"`` costs one tangent per pixel; the training set is only a pool to draw the
    ten real images from (``seed`` picks them).

    Attributes:
      steps, lr: gradient steps T and learning rate of the inner training.
    """

    DEFAULTS = {
        "digits": {"n_train": 800, "n_val": 500, "n_test": None},
        "paper": {"n_train": 10_000, "n_val": 10_000, "n_test": 10_000},
    }

    hyper_steps: int = 200
    hyper_lr: float = 0.02
    steps: int = 100
    lr: float = 1.0


def tiny(dataset: str = "digits") -> Config:
    return Config(dataset=dataset, hyper_steps=15, hyper_lr=0.05, n_train=200, n_val=200, n_test=300,
                  steps=20, truncation=5)


class Distill(runner.Experiment):
    name, methods = NAME, METHODS

    def __init__(self, config: Config, data):
        super().__init__(config, data)
        train, val = data.train, data.val
        k, n_features = data.n_classes, train.x.shape[1]
        labels = jnp.arange(k)
        xv, yv = jnp.asarray(val.x), jnp.asarray(val.y)

        def loss(w, lam, batch):
            return models.cross_entropy(models.softmax_regression_apply(w, lam["images"]), labels)

        def objective(w, lam):
            return models.cross_entropy(models.softmax_regression_apply(w, xv), yv)

        self.objective, self.logits = objective, linear_logits
        self.dynamics = hg.Dynamics(
            init=models.softmax_regression_init(n_features, k),
            loss=loss,
            optimizer=hg.optim.sgd(),
            optimizer_hparams=lambda lam, t: {"lr": config.lr},
            steps=config.steps,
        )
        rng = np.random.default_rng(config.seed)
        self.real = np.stack([train.x[rng.choice(np.flatnonzero(train.y == j))] for j in range(k)])
        self.means = np.stack([train.x[train.y == j].mean(axis=0) for j in range(k)])

    def score(self, tuned: runner.Tuned) -> dict:
        return _accuracy(self.scores(tuned.params))

    def score_images(self, images) -> dict:
        """The figures of softmax regression trained on ``images``."""
        return _accuracy(self.scores(self.train({"images": jnp.asarray(images, jnp.float32)})))

    def baseline(self) -> tuple[dict, dict]:
        """Ten random real images (one per class), and the ten class means."""
        random_real, class_means = self.score_images(self.real), self.score_images(self.means)
        runner.detail(f"test accuracy: 10 random real images {random_real['test_accuracy']:.4f}, "
                      f"the 10 class means of {len(self.data.train.x)} training images "
                      f"{class_means['test_accuracy']:.4f}")
        return random_real, class_means

    def searches(self, baseline) -> list[runner.Search]:
        return [runner.Search("optimize", {"images": jnp.asarray(self.real, jnp.float32)},
                              hg.constraints.box(0.0, 1.0))]

    def report(self, out_dir, baseline, tuned, scores) -> runner.Report:
        (random_real, class_means), (t,), (distilled,) = baseline, tuned, scores
        runner.detail(f"test accuracy: distilled {distilled['test_accuracy']:.4f} "
                      f"(random real {random_real['test_accuracy']:.4f})")
        learned = np.asarray(t.hparams["images"])
        np.save(out_dir / "distilled_images.npy", learned)
        fields = {
            "hyper_steps": int(len(t.history["value"])),
            "val_loss_random_real": random_real["val_loss"],
            "val_loss_distilled": distilled["val_loss"],
            "test_accuracy_random_real": random_real["test_accuracy"],
            "test_accuracy_distilled": distilled["test_accuracy"],
            "test_accuracy_class_means": class_means["test_accuracy"],
            **t.selection(),
            "note": t.note,
        }
        figure = _plot(out_dir, self.data, self.real, learned, self.means)
        return runner.Report(fields, [figure], history_columns(t.history), arrays=["distilled_images.npy"])


def run(config: Config, out_dir, progress: bool | None = None) -> dict:
    """Run the experiment; write config.json, history.csv, result.json and plots to ``out_dir``."""
    return runner.run(Distill, config, out_dir, progress)


def _accuracy(scores: dict) -> dict:
    return {"val_loss": scores["val_loss"], "test_accuracy": 1.0 - scores["test_error"],
            "test_loss": scores["test_loss"]}


def _plot(out_dir: Path, data, real, learned, means) -> str:
    plt = plots.pyplot()
    k = len(real)
    names = plots.class_names(data.name, k)
    fig, axes = plt.subplots(3, k, figsize=(1.3 * k, 4.4))
    plots.image_grid(axes[0], real, [f"{n}\n(random real)" if i == 0 else n for i, n in enumerate(names)],
                 data.image_shape)
    plots.image_grid(axes[1], learned, ["distilled" if i == 0 else "" for i in range(k)], data.image_shape)
    plots.image_grid(axes[2], means, ["class mean" if i == 0 else "" for i in range(k)], data.image_shape)
    return plots.savefig(fig, out_dir / "distilled_images.png")
