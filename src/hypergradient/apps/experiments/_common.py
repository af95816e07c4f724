"""What the experiments share: data, methods by name, the results folder, plots.

Experiments sit above the library: they build a :class:`hypergradient.Dynamics`
and call the public drivers (``hg.optimize``, ``hg.online``); nothing below
them knows they exist.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import hypergradient as hg
from hypergradient.apps import datasets
from hypergradient.errors import ExperimentError

# Every method name an experiment may accept, and how to build it.
METHOD_HELP = {
    "reverse": "Reverse-HG: backpropagation through the whole training run (exact; memory ~T·d)",
    "forward": "Forward-HG: tangents carried along the run (exact; time ~m× a training run)",
    "truncated": "reverse through the last K steps only (biased; memory ~K·d)",
    "reversible": "Maclaurin et al.: exact reversal of momentum SGD in fixed point (memory ~d)",
    "drmad": "DrMAD: reverse pass along the straight line from w_0 to w_T (approximate; memory ~2d)",
    "rtho": "real-time forward (RTHO): λ updated every Δ steps of one run, tangent carried",
    "trho": "real-time truncated reverse (TRHO): λ updated every Δ steps from the last K steps",
}


def say(message: str) -> None:
    """A status line for the person running the experiment (stderr, so stdout stays the summary)."""
    print(message, file=sys.stderr, flush=True)


# -- hyperparameter-free choices ------------------------------------------------------

def load_data(config) -> datasets.Splits:
    """The dataset of ``config`` with its sizes (``n_test=None``: the loader's default)."""
    return datasets.load(config.dataset, config.data_dir, n_train=config.n_train, n_val=config.n_val,
                         n_test=config.n_test)


def fill_defaults(config, **defaults: tuple[Any, Any]):
    """``config`` with each field left ``None`` set from ``field=(digits value, paper-scale value)``:
    the first for the small bundled dataset, the second for the IDX datasets."""
    pick = 0 if config.dataset == "digits" else 1
    return dataclasses.replace(
        config, **{k: v[pick] for k, v in defaults.items() if getattr(config, k) is None}
    )


def make_method(name: str, truncation: int | None = None):
    """The hypergradient method called ``name`` (see :data:`METHOD_HELP`)."""
    if name == "reverse":
        return hg.Reverse()
    if name == "forward":
        return hg.Forward()
    if name == "truncated":
        return hg.Truncated(int(truncation))
    if name in ("reversible", "drmad"):
        cls_name = {"reversible": "Reversible", "drmad": "DrMAD"}[name]
        cls = getattr(hg, cls_name, None)
        if cls is None:  # not exported under the public name (yet)
            import importlib

            try:
                cls = getattr(importlib.import_module(f"hypergradient.methods.{name}"), cls_name)
            except (ImportError, AttributeError):
                cls = None
        if cls is None:
            raise ExperimentError(f"method {name!r} ({cls_name}) is not available in this version of hypergradient")
        return cls()
    raise ExperimentError(f"unknown method {name!r}; known: {', '.join(METHOD_HELP)}")


def check_method(experiment: str, name: str, allowed: Sequence[str]) -> None:
    if name not in allowed:
        raise ExperimentError(
            f"experiment {experiment!r} has no method {name!r}; choose one of: {', '.join(allowed)}"
        )


def optimize(*args, **kwargs):
    """``hg.optimize`` (the offline driver)."""
    return hg.optimize(*args, **kwargs)


def online(*args, **kwargs):
    """``hg.online`` (the real-time driver)."""
    return hg.online(*args, **kwargs)


def divergence_types() -> tuple[type, ...]:
    """The drivers' divergence error, which holds the last good λ."""
    return (hg.HyperDivergenceError,)


def tune(label: str, out_dir: Path, *args, **kwargs):
    """``optimize`` checkpointed under ``out_dir/checkpoints/label``, keeping the best λ seen.

    Every hyper-step evaluates f(λ_k) on the validation objective, so the
    λ returned is the one with the lowest validation value among those
    visited, the final one included (early stopping on the objective being
    optimized: a hyper-optimizer that overshoots late does not spoil the
    result). A divergence part-way is not fatal either: the experiment goes
    on with the best finite λ and says so.

    Returns ``(hparams, history, info)``: ``info`` has ``selected_step`` (the
    hyper-step of the λ returned; ``len(history)`` for the final λ),
    ``selected_value`` and ``note`` (``""`` or what went wrong).
    """
    kwargs.setdefault("checkpoint_dir", out_dir / "checkpoints" / label)
    best = {"value": np.inf, "hparams": None, "step": -1}

    def keep_best(step, hparams, value, grad):
        if np.isfinite(value) and value < best["value"]:
            best.update(value=float(value), hparams=hparams, step=int(step))
        return False

    note = ""
    try:
        res = optimize(*args, callback=keep_best, **kwargs)
        final = (res.value, res.hparams, res.steps)
        history = res.history
    except divergence_types() as e:
        note = f"{label}: training diverged at hyper-step {e.hyper_step}; kept the best λ before it"
        say("warning: " + note)
        final = (np.inf, e.hparams, -1)
        history = e.history
    _restore_best_from_history(best, history)
    if final[0] <= best["value"] or best["hparams"] is None:
        value, hparams, step = final
    else:
        value, hparams, step = best["value"], best["hparams"], best["step"]
    return hparams, history, {"selected_step": int(step), "selected_value": float(value), "note": note}


def _restore_best_from_history(best: dict, history: Mapping[str, Any]) -> None:
    """After a resume the callback saw only the later steps: look at the recorded ones too."""
    import jax

    values = np.asarray(history.get("value", []), np.float64)
    if "hparams" not in history or not len(values) or not np.isfinite(values).any():
        return
    k = int(np.nanargmin(np.where(np.isfinite(values), values, np.inf)))
    if values[k] < best["value"]:
        best.update(value=float(values[k]), step=k,
                    hparams=jax.tree.map(lambda a: np.asarray(a[k]), history["hparams"]))


# -- numpy evaluation (no compilation) --------------------------------------------------

def np_tree(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def metrics(logits: np.ndarray, y: np.ndarray) -> dict:
    """Mean cross-entropy and error rate of ``logits`` against integer labels ``y``."""
    logits = np.asarray(logits, np.float64)
    loss = -log_softmax(logits)[np.arange(len(y)), y].mean()
    error = float(np.mean(np.argmax(logits, axis=-1) != y))
    return {"loss": float(loss), "error": error}


def mlp_logits(params, x: np.ndarray) -> np.ndarray:
    params = np_tree(params)
    h = np.asarray(x, np.float64)
    for layer in params[:-1]:
        h = np.tanh(h @ layer["W"] + layer["b"])
    return h @ params[-1]["W"] + params[-1]["b"]


def linear_logits(params, x: np.ndarray) -> np.ndarray:
    params = np_tree(params)
    return np.asarray(x, np.float64) @ params[0]["W"] + params[0]["b"]


# -- the results folder -------------------------------------------------------------------

def jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.generic, np.ndarray)):
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=2) + "\n")
    os.replace(tmp, path)


def write_csv(path: Path, columns: Mapping[str, Sequence]) -> None:
    """One row per entry; columns of unequal length are padded with blanks."""
    names = list(columns)
    n = max((len(v) for v in columns.values()), default=0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for i in range(n):
            w.writerow([_cell(columns[k], i) for k in names])


def _cell(col, i):
    if i >= len(col):
        return ""
    v = col[i]
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.8g}"
    return v


def history_columns(history: Mapping[str, Any], **extra: Sequence) -> dict:
    """The scalar per-hyper-step series of a driver's history, as CSV columns."""
    cols = {"hyper_step": list(range(len(history.get("value", []))))}
    for key in ("value", "grad_norm", "seconds"):
        if key in history:
            cols[key] = list(np.asarray(history[key]).reshape(-1))
    cols.update({k: list(v) for k, v in extra.items()})
    return cols


# Settings that may change between a run and its resumption: a checkpoint
# taken with fewer hyper-steps is continued, not discarded.
RESUMABLE_CHANGES = ("hyper_steps", "data_dir")


def prepare(out_dir: Path, config) -> Path:
    """Create ``out_dir`` and write ``config.json``.

    Checkpoints under ``out_dir/checkpoints`` are kept (a rerun resumes from
    them) only if they were made with the same configuration, up to
    :data:`RESUMABLE_CHANGES`; otherwise they are deleted.
    """
    import shutil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = out_dir / "checkpoints"
    if checkpoints.exists():
        try:
            before = json.loads((out_dir / "config.json").read_text())
        except (OSError, ValueError):
            before = None
        now = jsonable(config)
        same = before is not None and all(
            before.get(k) == v for k, v in now.items() if k not in RESUMABLE_CHANGES
        ) and set(before) == set(now)
        if same:
            say(f"resuming from the checkpoints in {checkpoints}")
        else:
            say(f"the configuration differs from the one in {out_dir}: starting afresh")
            shutil.rmtree(checkpoints)
    write_json(out_dir / "config.json", config)
    return out_dir


def finish(out_dir: Path, history_cols: Mapping[str, Sequence], result: dict) -> dict:
    write_csv(out_dir / "history.csv", history_cols)
    write_json(out_dir / "result.json", result)
    return result


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def savefig(fig, path: Path) -> str:
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


CLASS_NAMES = {
    "fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"],
}


def class_names(dataset: str, n: int = 10) -> list[str]:
    return CLASS_NAMES.get(dataset, [str(i) for i in range(n)])
