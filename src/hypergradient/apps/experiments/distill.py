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
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax

import hypergradient as hg
from hypergradient.apps import models

from . import _common as c

NAME = "distill"
METHODS = ("reverse", "forward", "truncated")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the distillation experiment (``None``: the dataset's value).

    Attributes:
      dataset, data_dir: which data.
      method: one of :data:`METHODS` (``forward`` costs one tangent per pixel).
      hyper_steps: Adam steps on the ten images.
      hyper_lr: Adam's learning rate on the pixel values.
      seed: which real images are drawn.
      n_train, n_val, n_test: digits 800 / 500 / the rest; otherwise 10,000 each.
        The training set is only a pool to draw the ten real images from.
      steps, lr: gradient steps T and learning rate of the inner training.
      truncation: K for ``method="truncated"``.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    method: str = "reverse"
    hyper_steps: int | None = None
    hyper_lr: float = 0.02
    seed: int = 0
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    steps: int = 100
    lr: float = 1.0
    truncation: int = 20

    def resolved(self) -> Config:
        return c.fill_defaults(
            self,
            hyper_steps=(200, 200),
            n_train=(800, 10_000),
            n_val=(500, 10_000),
            n_test=(None, 10_000),
        )


def tiny(dataset: str = "digits") -> Config:
    return Config(dataset=dataset, hyper_steps=15, hyper_lr=0.05, n_train=200, n_val=200, n_test=300,
                  steps=20, truncation=5)


def run(config: Config, out_dir, progress: bool | None = None) -> dict:
    config = config.resolved()
    c.check_method(NAME, config.method, METHODS)
    method = c.make_method(config.method, config.truncation)
    out_dir = c.prepare(Path(out_dir), config)
    started = time.perf_counter()

    data = c.load_data(config)
    train, val, test = data.train, data.val, data.test
    k, n_features = data.n_classes, train.x.shape[1]
    labels = jnp.arange(k)
    xv, yv = jnp.asarray(val.x), jnp.asarray(val.y)

    def loss(w, lam, batch):
        return models.cross_entropy(models.softmax_regression_apply(w, lam["images"]), labels)

    def objective(w, lam):
        return models.cross_entropy(models.softmax_regression_apply(w, xv), yv)

    dyn = hg.Dynamics(
        init=models.softmax_regression_init(n_features, k),
        loss=loss,
        optimizer=hg.optim.sgd(),
        optimizer_hparams=lambda lam, t: {"lr": config.lr},
        steps=config.steps,
    )

    def scores(images) -> dict:
        w = dyn.run({"images": jnp.asarray(images, jnp.float32)})
        v, t = c.metrics(c.linear_logits(w, val.x), val.y), c.metrics(c.linear_logits(w, test.x), test.y)
        return {"val_loss": v["loss"], "test_accuracy": 1.0 - t["error"], "test_loss": t["loss"]}

    rng = np.random.default_rng(config.seed)
    real = np.stack([train.x[rng.choice(np.flatnonzero(train.y == j))] for j in range(k)])
    means = np.stack([train.x[train.y == j].mean(axis=0) for j in range(k)])
    c.say(f"[1/2] baselines: 10 random real images, and the 10 class means of {len(train.x)} training images")
    random_real, class_means = scores(real), scores(means)
    c.say(f"      test accuracy: random real {random_real['test_accuracy']:.4f}, "
          f"class means {class_means['test_accuracy']:.4f}")

    c.say(f"[2/2] {config.hyper_steps} hyper-steps of Adam ({config.method}) on {k}×{n_features} pixels")
    lam0 = {"images": jnp.asarray(real, jnp.float32)}
    lam, history, info = c.tune(
        "optimize", out_dir, dyn, objective, lam0, method=method,
        hyper_optimizer=optax.adam(config.hyper_lr), hyper_steps=config.hyper_steps,
        constraint=hg.constraints.box(0.0, 1.0), progress=progress,
    )
    learned = np.asarray(lam["images"])
    distilled = scores(learned)
    c.say(f"      test accuracy: distilled {distilled['test_accuracy']:.4f} "
          f"(random real {random_real['test_accuracy']:.4f})")

    plots = [_plot(out_dir, data, real, learned, means)]
    np.save(out_dir / "distilled_images.npy", learned)
    result = {
        "experiment": NAME,
        "dataset": config.dataset,
        "method": config.method,
        "hyper_steps": int(len(history["value"])),
        "val_loss_random_real": random_real["val_loss"],
        "val_loss_distilled": distilled["val_loss"],
        "test_accuracy_random_real": random_real["test_accuracy"],
        "test_accuracy_distilled": distilled["test_accuracy"],
        "test_accuracy_class_means": class_means["test_accuracy"],
        "seconds": time.perf_counter() - started,
        "plots": plots,
        "selected_hyper_step": info["selected_step"],
        "note": info["note"],
    }
    return c.finish(out_dir, c.history_columns(history), result)


def _plot(out_dir: Path, data, real, learned, means) -> str:
    plt = c.pyplot()
    k = len(real)
    names = c.class_names(data.name, k)
    fig, axes = plt.subplots(3, k, figsize=(1.3 * k, 4.4))
    c.image_grid(axes[0], real, [f"{n}\n(random real)" if i == 0 else n for i, n in enumerate(names)],
                 data.image_shape)
    c.image_grid(axes[1], learned, ["distilled" if i == 0 else "" for i in range(k)], data.image_shape)
    c.image_grid(axes[2], means, ["class mean" if i == 0 else "" for i in range(k)], data.image_shape)
    return c.savefig(fig, out_dir / "distilled_images.png")
