"""A small byte-level transformer language model tuned end to end.

The model, its training and λ are :mod:`hypergradient.apps.lm`'s: a decoder-only transformer
(:mod:`hypergradient.apps.transformer`, attention by ``jax.nn.dot_product_attention`` with
``implementation="xla"``, which is differentiable twice; cuDNN's is not) trained a few hundred
steps by AdamW with a warmup-cosine schedule, on byte windows of several text sources::

    lr_t = warmup_cosine(t, exp(log_peak), warmup, T),   weight decay exp(log_wd),
    window i's weight in the training loss  S · softmax(source_logits)[source_i]

Tuned by hypergradient (``hg.optimize``, Reverse by default) on the validation windows' mean
next-byte cross-entropy (every source alike, unweighted), from the defaults (peak 3e-3, decay
1e-2, equal source weights), which are also the baseline; λ is kept in a box. The test windows
score both. ``hypergradient compare lm`` tunes the same λ by random search at equal wall time.

The data (``--dataset text``) are the sources of a folder (``--data-dir``: each entry a source,
:func:`hypergradient.apps.text.folder_sources`), by default the ``.py`` files of four packages of
the running Python's standard library (:func:`hypergradient.apps.text.stdlib_sources`: nothing
downloaded; the result records the Python version, on which the bytes depend). Each source's
bytes are cut into training, validation and test stretches; a fixed draw of windows from each
part is used (``n_train``, ``n_val``, ``n_test``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import datasets, lm, text
from . import plots, runner
from .folder import history_columns

NAME = "lm"
METHODS = ("reverse", "checkpoint", "forward")
DATASETS = ("text",)


@dataclasses.dataclass(frozen=True)
class Config(runner.Config):
    """Settings of the language-model experiment (the shared fields: :class:`.runner.Config`).

    Attributes:
      steps, batch_size: AdamW steps T and windows per step.
      context, d_model, heads, layers: the transformer (context: bytes each window reads).
      peak, weight_decay: the defaults of λ (the baseline, and where tuning starts); equal
        source weights.
      warmup: the schedule's warmup steps (fixed).
      peak_bounds, wd_bounds, source_weight_bounds: the box λ is kept in, in natural units
        (a source weight: ``exp(source_logit)`` before the normalization to mean 1).
      val_fraction, test_fraction: each source's share of bytes for validation and test.
    """

    DEFAULTS = {"digits": {"n_train": 2048, "n_val": 128, "n_test": 512},
                "paper": {"n_train": 2048, "n_val": 128, "n_test": 512}}

    dataset: str = "text"
    hyper_steps: int = 20
    hyper_lr: float = 0.1
    steps: int = 200
    batch_size: int = 8
    context: int = 32
    d_model: int = 32
    heads: int = 2
    layers: int = 2
    peak: float = 3e-3
    weight_decay: float = 1e-2
    warmup: int = 20
    peak_bounds: tuple[float, float] = (3e-4, 3e-2)
    wd_bounds: tuple[float, float] = (1e-4, 1.0)
    source_weight_bounds: tuple[float, float] = (0.1, 10.0)
    val_fraction: float = 0.05
    test_fraction: float = 0.05


def tiny(dataset: str = "text") -> Config:
    """A configuration that runs in seconds (for tests)."""
    return Config(dataset=dataset, hyper_steps=3, hyper_lr=0.2, n_train=256, n_val=32, n_test=64, steps=20,
                  batch_size=4, context=8, d_model=8, heads=1, layers=1, warmup=2)


class TextData(NamedTuple):
    """Byte windows in three parts, as ``datasets.Split(x=tokens (N, L + 1), y=source (N,))``, the
    sources' names and, for the standard library's text, the Python version it comes from."""

    train: datasets.Split
    val: datasets.Split
    test: datasets.Split
    sources: tuple[str, ...]
    python: str | None
    name: str = "text"


def load(config: Config) -> TextData:
    """The windows of ``config`` (resolved): a fixed draw (``default_rng(0)``) of ``n_train``,
    ``n_val`` and ``n_test`` windows from each part (all of a part when it has fewer)."""
    if config.dataset not in DATASETS:
        raise ValueError(f"experiment {NAME!r} reads text, not {config.dataset!r}; use --dataset text "
                         "(with --data-dir a folder whose entries are the sources)")
    sources = text.stdlib_sources() if config.data_dir is None else text.folder_sources(config.data_dir)
    parts = text.splits(sources, config.context + 1, config.val_fraction, config.test_fraction)
    rng = np.random.default_rng(0)
    drawn = []
    for (tokens, source), n in zip(parts, (config.n_train, config.n_val, config.n_test)):
        keep = np.sort(rng.choice(len(tokens), min(n, len(tokens)), replace=False))
        drawn.append(datasets.Split(tokens[keep], source[keep]))
    return TextData(*drawn, tuple(sources), text.python_version() if config.data_dir is None else None)


def box(config: Config, n_sources: int):
    """The projection of λ onto the box of ``config`` (traceable)."""
    bounds = {"log_peak": np.log(config.peak_bounds), "log_wd": np.log(config.wd_bounds),
              "source_logits": np.log(config.source_weight_bounds)}

    def project(lam):
        return {k: jnp.clip(v, *bounds[k]).astype(v.dtype) for k, v in lam.items()}

    return project


class LanguageModel(runner.Experiment):
    name, methods = NAME, METHODS

    @classmethod
    def load_data(cls, config: Config) -> TextData:
        return load(config)

    def __init__(self, config: Config, data: TextData):
        super().__init__(config, data)
        train = (data.train.x, data.train.y)
        self.dynamics = lm.make_dynamics(train, config.steps, config.batch_size, config.d_model, config.heads,
                                         config.layers, config.peak, config.weight_decay, config.warmup)(config.seed)
        self.objective = lm.objective(data.val.x, config.heads)
        self.lam0 = lm.default_lam(len(data.sources), config.peak, config.weight_decay)
        heads = config.heads
        val, test = jnp.asarray(data.val.x), jnp.asarray(data.test.x)
        self._scores = jax.jit(lambda w: (lm.byte_scores(w, val, heads), lm.byte_scores(w, test, heads)))

    def scores(self, params) -> dict:
        """Validation and test cross-entropy (nats per byte) and next-byte error (diverged: inf and 1)."""
        if params is None:
            return {"val_loss": float("inf"), "val_error": 1.0, "test_loss": float("inf"), "test_error": 1.0}
        (vl, ve), (tl, te) = self._scores(params)
        return {"val_loss": float(vl), "val_error": float(ve), "test_loss": float(tl), "test_error": float(te)}

    def baseline(self) -> dict:
        scores = self.scores(self.train(self.lam0))
        runner.detail(f"defaults (peak {self.config.peak:g}, weight decay {self.config.weight_decay:g}, equal "
                      f"source weights): validation loss {scores['val_loss']:.4f} nats per byte")
        return scores

    def searches(self, baseline) -> list[runner.Search]:
        return [runner.Search("optimize", self.lam0, box(self.config, len(self.data.sources)))]

    def report(self, out_dir, baseline, tuned, scores) -> runner.Report:
        (t,), (s,) = tuned, scores
        lam = t.hparams
        weights = lm.source_weights(lam)
        runner.detail(f"validation loss: tuned {s['val_loss']:.4f}, defaults {baseline['val_loss']:.4f} nats per byte")
        fields = {
            "hyper_steps": int(len(t.history["value"])),
            "val_loss_default": baseline["val_loss"], "val_loss_tuned": s["val_loss"],
            "test_loss_default": baseline["test_loss"], "test_loss_tuned": s["test_loss"],
            "test_error_default": baseline["test_error"], "test_error_tuned": s["test_error"],
            "peak_lr_tuned": float(np.exp(lam["log_peak"])), "weight_decay_tuned": float(np.exp(lam["log_wd"])),
            "sources": list(self.data.sources), "source_weights_tuned": [float(w) for w in weights],
            "python": self.data.python,
            "parameters": int(sum(np.size(x) for x in jax.tree.leaves(self.dynamics.initial_params(lam)))),
            **t.selection(),
            "tune_seconds": t.seconds,
            "note": t.note,
        }
        figure = _plot(out_dir, t, baseline["val_loss"], self.data.sources, weights)
        return runner.Report(fields, [figure], history_columns(t.history))


def run(config: Config, out_dir, progress: bool | None = None) -> dict:
    """Run the experiment; write config.json, history.csv, result.json and plots to ``out_dir``."""
    return runner.run(LanguageModel, config, out_dir, progress)


def _plot(out_dir: Path, tuned, baseline: float, sources, weights) -> str:
    plt = plots.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    plots.curve(left, tuned, "tuned")
    left.axhline(baseline, color="gray", ls="--", label="defaults")
    left.set(xlabel="hyper-step", ylabel="validation loss (nats per byte)", title="hyper-optimization")
    left.legend()
    right.bar(range(len(sources)), weights, color="tab:blue", label="tuned")
    right.axhline(1.0, color="gray", ls="--", label="defaults")
    right.set_xticks(range(len(sources)), sources)
    right.set(ylabel="weight in the training loss", title="source weights")
    right.legend()
    return plots.savefig(fig, out_dir / "lm.png")
