"""``hypergradient attribute EXPERIMENT``: which training examples help the validation loss, which
hurt it, by :func:`hypergradient.attribute` on the experiment's training run at weight 1.

Writes to the results folder:

- ``scores.npy``: ∂(validation loss)/∂(weight of example i), one per training example, and
  ``scores.npz`` (the scores with their example ids);
- ``examples.csv``: the ``--top`` most helpful (most negative scores: upweighting them lowers the
  validation loss) and most harmful (most positive) examples: index, label, score, whether the
  label was flipped;
- ``examples.png``: those examples as a grid of images titled with their labels, flipped ones red;
- ``result.json``: the figures below, printed too.

With flipped labels (hyper-cleaning flips a fraction of them), the flipped examples are the harmful
ones: the summary gives the share of flipped labels among the most harmful and the AUC of the
score as a detector of flipped labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import hypergradient as hg

from . import datasets, experiments
from .experiments import folder, plots
from .terminal import EXIT_DIVERGED, EXIT_INPUT, EXIT_OK, folder_name, not_a_folder, os_error, positive_int, seed

#: The experiments whose training run weighs its examples one by one.
EXPERIMENTS = ("hyper-cleaning",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", metavar="EXPERIMENT", choices=EXPERIMENTS,
                        help="whose training run to attribute: " + ", ".join(EXPERIMENTS))
    parser.add_argument("--dataset", default="digits", choices=datasets.DATASETS, help="as for run")
    parser.add_argument("--data-dir", metavar="DIR", help="as for run")
    parser.add_argument("--seed", type=seed, default=0, metavar="S", help="which labels are flipped (default 0)")
    parser.add_argument("--top", type=positive_int, default=12, metavar="K",
                        help="how many most helpful and most harmful examples to list and draw (default 12)")
    parser.add_argument("--out", type=folder_name, metavar="DIR",
                        help="results folder (default results/attribute-EXPERIMENT-DATASET[-tiny])")
    parser.add_argument("--tiny", action="store_true", help="the experiment's tiny configuration (seconds)")


@dataclasses.dataclass(frozen=True)
class _ExampleWeighted:
    """Hyper-cleaning's loss, which weighs its batch by ``lam["weights"]``, taking the weights of
    attribution on top: ``loss(w, λ, batch, *, example_weights)``."""

    loss: object

    def __call__(self, w, lam, batch, *, example_weights=1.0):
        return self.loss(w, {**lam, "weights": lam["weights"] * example_weights}, batch)


def problem(args):
    """``(dyn, objective, λ, data, noisy labels, flipped mask)`` of hyper-cleaning at weight 1."""
    from .experiments import hyper_cleaning

    module = experiments.get(args.experiment)
    config = module.tiny(args.dataset) if args.tiny else module.Config(dataset=args.dataset)
    config = dataclasses.replace(config, data_dir=args.data_dir, seed=args.seed).resolved()
    data = datasets.load(config.dataset, config.data_dir, n_train=config.n_train, n_val=config.n_val,
                         n_test=config.n_test)
    exp = hyper_cleaning.HyperCleaning(config, data)
    dyn = exp.dynamics.replace(loss=_ExampleWeighted(exp.dynamics.loss))
    lam = {"weights": jnp.ones(exp.n, jnp.float32)}
    return dyn, exp.objective, lam, data, np.asarray(dyn.data[1]), exp.flipped


def main(args: argparse.Namespace, error) -> int:
    out = Path(args.out) if args.out else Path("results") / (
        f"attribute-{args.experiment}-{args.dataset}" + ("-tiny" if args.tiny else ""))
    if reason := not_a_folder(out):
        return error(f"cannot write the results to {out}: {reason}", EXIT_INPUT)
    try:
        dyn, objective, lam, data, labels, flipped = problem(args)
    except (FileNotFoundError, ValueError) as e:
        return error(str(e), EXIT_INPUT)
    print(f"hypergradient attribute {args.experiment}: {len(labels)} training examples, {int(flipped.sum())} "
          f"labels flipped -> {out}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        res = hg.attribute(dyn, objective, lam)
    except hg.DivergenceError as e:
        return error(f"the run diverged: {e}", EXIT_DIVERGED)
    try:
        return _write(out, args, res, data, labels, flipped, started)
    except OSError as e:  # a read-only folder, a full disk
        return error(os_error(e, out), EXIT_INPUT)


def _write(out: Path, args, res, data, labels, flipped, started: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(res.scores)
    np.save(out / "scores.npy", scores)
    res.save(out / "scores.npz")
    k = min(args.top, len(scores) // 2)
    order = np.argsort(scores)
    helpful, harmful = order[:k], order[::-1][:k]
    picked = np.concatenate([helpful, harmful])
    folder.write_csv(out / "examples.csv", {
        "kind": ["helpful"] * k + ["harmful"] * k, "rank": list(range(1, k + 1)) * 2,
        "index": picked.tolist(), "label": labels[picked].tolist(), "score": scores[picked].tolist(),
        "flipped": flipped[picked].tolist()})
    _grid(out / "examples.png", data, labels, flipped, scores, helpful, harmful)
    summary = {
        "experiment": args.experiment, "dataset": args.dataset, "examples": len(scores),
        "flipped": int(flipped.sum()), "validation_loss": float(res.value),
        "flipped_among_harmful": float(flipped[harmful].mean()),
        "flipped_among_helpful": float(flipped[helpful].mean()),
        "flipped_detection_auc": _auc(scores, flipped), "seconds": time.perf_counter() - started,
        "attribute_seconds": res.stats["seconds"], "temp_bytes": res.stats["temp_bytes"],
    }
    folder.write_json(out / "result.json", summary)
    for key, value in summary.items():
        print(f"{key:<22} {value:.4g}" if isinstance(value, float) else f"{key:<22} {value}")
    return EXIT_OK


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative): how well high scores find ``positive`` examples."""
    if positive.all() or not positive.any():
        return float("nan")
    ranks = np.argsort(np.argsort(scores)) + 1
    n_pos = int(positive.sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(scores) - n_pos)))


def _grid(path: Path, data, labels, flipped, scores, helpful, harmful) -> None:
    plt = plots.pyplot()
    names = plots.class_names(data.name, data.n_classes)
    k = len(helpful)
    fig, axes = plt.subplots(2, k, figsize=(1.2 * k, 3.2), squeeze=False)
    for row, (ax_row, picked, kind) in enumerate(zip(axes, (helpful, harmful), ("most helpful", "most harmful"))):
        titles = [f"{names[labels[i]]}\n{scores[i]:+.1e}" for i in picked]
        plots.image_grid(ax_row, data.train.x[picked], titles, data.image_shape)
        for ax, i in zip(ax_row, picked):
            if flipped[i]:
                ax.title.set_color("red")
        ax_row[0].set_ylabel(kind, fontsize=8)
    fig.suptitle("training examples by score (label, score; red: flipped label)", fontsize=9)
    plots.savefig(fig, path)
