"""The saved record of each finished gradient run (``runs/*.json``), read back instead of rerun."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .clock import Run


def _path(out: Path, key: dict) -> Path:
    return out / "runs" / f"{key['regime']}-{key['method']}-seed{key['seed']}.json"


def load(out: Path, key: dict) -> Run | None:
    """The run saved under ``key`` (experiment, dataset, regime, method, seed, budget...), or ``None``."""
    try:
        rec = json.loads(_path(out, key).read_text())
    except (OSError, ValueError):
        return None
    if rec.get("key") != key:
        return None
    choice = None if rec["choice"] is None else {k: np.asarray(v, np.float32) for k, v in rec["choice"].items()}
    return Run(rec["method"], rec["regime"], rec["seed"], [tuple(p) for p in rec["trace"]], choice,
               rec["evaluations"], rec["note"])


def save(out: Path, key: dict, run: Run) -> None:
    """Write ``run`` under ``key``, atomically."""
    path = _path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"key": key, "method": run.method, "regime": run.regime, "seed": run.seed, "trace": run.trace,
           "choice": None if run.choice is None else {k: v.tolist() for k, v in run.choice.items()},
           "evaluations": run.evaluations, "note": run.note}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)
