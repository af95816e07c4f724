"""The papers' experiments, one module each, and their registry.

Every experiment module has

- ``NAME`` (its one-line description is in :data:`DESCRIPTIONS` here),
- ``METHODS``: the accepted ``--method`` names, the first being the default,
- ``Config``: a frozen dataclass extending :class:`.runner.Config` (the fields
  every experiment shares) with its own fields, and ``DEFAULTS``, the table of
  per-dataset values that ``resolved()`` gives the fields left ``None``,
- ``tiny(dataset)``: a configuration that runs in seconds,
- optionally ``DATASETS``: the ``--dataset`` names it reads, the first being the default
  (without it, the image datasets of :data:`hypergradient.apps.datasets.DATASETS`; an
  experiment with its own data says how to load them in ``Experiment.load_data``),
- ``run(config, out_dir, progress) -> dict``: runs it, writes ``config.json``,
  ``history.csv``, ``result.json`` and PNG plots to ``out_dir`` and returns
  the summary (the same dict as ``result.json``).

``run`` hands an :class:`~.runner.Experiment` subclass to :func:`.runner.run`,
which owns the stages (prepare → baseline → tune → score → report), the
results folder and the divergence handling. To add an experiment: write one
module like ``distill.py`` and register it below.

Experiments use only the public API (``hg.Dynamics``, ``hg.optimize``,
``hg.online``, ``hg.constraints``) and the other applications (``datasets``,
``models``, ``methods``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .. import datasets

# name -> module (imported on first use, so `hypergradient list` stays fast)
_MODULES = {
    "schedules": "schedules",
    "hyper-cleaning": "hyper_cleaning",
    "realtime": "realtime",
    "distill": "distill",
    "l2-per-weight": "l2_per_weight",
    "resnet": "resnet",
    "lm": "language_model",
}

# One-line descriptions, kept here so listing imports no experiment.
DESCRIPTIONS = {
    "schedules": "per-step, per-layer learning rates, momenta and init scales of a tanh MLP (Maclaurin §3.1)",
    "hyper-cleaning": "one weight per training example to discount flipped labels (Franceschi et al. 2017)",
    "realtime": "Adam's learning rate and an L2 strength of a CNN, tuned during one run (RTHO/TRHO)",
    "distill": "ten synthetic training images, one per class, for logistic regression (Maclaurin §3.3)",
    "l2-per-weight": "one L2 strength per input weight of logistic regression (Maclaurin §3.2)",
    "resnet": "per-layer learning rates, weight decay and augmentation of a small ResNet (BatchNorm, dropout, AdamW)",
    "lm": "AdamW's peak learning rate, weight decay and per-source data weights of a byte-level transformer LM",
}


#: Every ``--dataset`` name some experiment reads: the image datasets, and the LM's text.
ALL_DATASETS = (*datasets.DATASETS, "text")


def datasets_of(module: ModuleType) -> tuple[str, ...]:
    """The ``--dataset`` names the experiment in ``module`` reads, its default first."""
    return getattr(module, "DATASETS", datasets.DATASETS)


def choose_dataset(args, module: ModuleType) -> str | None:
    """Set ``args.dataset`` (parsed arguments) to the experiment's default when none was given;
    the error message when the experiment does not read the one given (``None`` when it does)."""
    accepted = datasets_of(module)
    args.dataset = args.dataset or accepted[0]
    if args.dataset not in accepted:
        return f"experiment {module.NAME!r} reads {', '.join(accepted)}, not {args.dataset!r}"
    return None


def names() -> tuple[str, ...]:
    """The experiments, in the order ``hypergradient list`` shows them."""
    return tuple(_MODULES)


def get(name: str) -> ModuleType:
    """The module of experiment ``name``; ``KeyError`` naming the known ones otherwise."""
    if name not in _MODULES:
        raise KeyError(f"unknown experiment {name!r}; known experiments: {', '.join(_MODULES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")
