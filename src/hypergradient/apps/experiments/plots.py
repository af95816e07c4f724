"""What the experiments' figures share: matplotlib without a display, image grids, the learning curve."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

CLASS_NAMES = {
    "fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"],
}

#: The plot of an interrupted run (the run that completes it removes it).
INTERRUPTED = "interrupted.png"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def savefig(fig, path: Path) -> str:
    """Write ``fig`` to ``path`` (PNG), close it; returns the file's name."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path.name


def image_grid(ax_row, images: np.ndarray, titles: Sequence[str], image_shape, cmap="gray", symmetric=False):
    """Draw ``images`` (N, H*W) on the axes ``ax_row`` with a title each."""
    for ax, img, title in zip(ax_row, images, titles):
        img = np.asarray(img).reshape(image_shape)
        if symmetric:
            m = float(np.max(np.abs(img))) or 1.0
            ax.imshow(img, cmap=cmap, vmin=-m, vmax=m)
        else:
            ax.imshow(img, cmap=cmap)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])


def class_names(dataset: str, n: int = 10) -> list[str]:
    return CLASS_NAMES.get(dataset, [str(i) for i in range(n)])


def curve(ax, tuned, label: str) -> None:
    """The validation objective per hyper-step of ``tuned`` (a ``runner.Tuned``) on ``ax``, with its
    selected hyper-step marked (one past the curve when the final λ is selected)."""
    line, = ax.plot(tuned.history["value"], label=label)
    if np.isfinite(tuned.selected_value):
        ax.plot([tuned.selected_step], [tuned.selected_value], "o", mfc="none", ms=8, color=line.get_color(),
                label=f"selected: hyper-step {tuned.selected_step}")


def learning_curve(out_dir: Path, tuned, baseline: float, label: str, baseline_label: str) -> str:
    """The validation loss per hyper-step of ``tuned`` against the baseline's, as ``learning_curve.png``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    curve(ax, tuned, label)
    ax.axhline(baseline, color="gray", ls="--", label=baseline_label)
    ax.set(xlabel="hyper-step", ylabel="validation loss", title="hyper-optimization")
    ax.legend()
    return savefig(fig, out_dir / "learning_curve.png")


def finished_curves(out_dir: Path, curves: Mapping[str, tuple[Sequence[int], Sequence[float]]]) -> str:
    """The objective of each search's finished hyper-steps, ``{label: (hyper-steps, values)}``, as
    ``interrupted.png``: what an interrupted run has to show."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, ".-", label=label)
    ax.set(xlabel="hyper-step", ylabel="objective f(λ_k)", title="hyper-optimization (interrupted)")
    ax.legend()
    return savefig(fig, out_dir / INTERRUPTED)
