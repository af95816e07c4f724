"""The results folder of a run: who holds it, config.json (and whether its checkpoints still apply),
history.csv, result.json."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hypergradient.errors import ExperimentError

from ..terminal import say

LOCK_FILE = ".lock"


@contextlib.contextmanager
def claim(out_dir: Path) -> Iterator[Path]:
    """Create ``out_dir`` and hold it while the block runs: a second run into it meanwhile is refused.

    The hold is an ``flock`` on ``out_dir/.lock``, which the system releases when this process
    ends, however it ends (kill -9 included); the file holds the pid, for the refusal's message.

    Raises:
      ExperimentError: another process holds ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644), "r+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read().strip() or "unknown"
            raise ExperimentError(f"{out_dir} is in use by another run (pid {holder}); wait for it to end, "
                                  "or choose another --out") from None
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield out_dir


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON values (dataclasses, arrays, paths; non-finite floats as strings)."""
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
    """Write ``obj`` as indented JSON, atomically."""
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


def prepare(out_dir: Path, config, resumable_changes: Sequence[str]) -> Path:
    """Write ``config.json`` in ``out_dir``, once what another configuration left there is gone.

    With the same configuration everything is kept. With another one, the outputs of the previous
    run (history.csv, result.json and the files it lists) are deleted, and so are the checkpoints
    under ``out_dir/checkpoints`` unless only fields in ``resumable_changes`` differ (a rerun
    resumes from them). All this happens before config.json is rewritten, so a run killed at any
    moment never leaves a config.json beside another configuration's results.
    """
    checkpoints = out_dir / "checkpoints"
    before, now = _read_json(out_dir / "config.json"), jsonable(config)
    if before != now:
        _delete_outputs(out_dir)
        resumable = before is not None and set(before) == set(now) and all(
            before[k] == v for k, v in now.items() if k not in resumable_changes)
        if not resumable and checkpoints.exists():
            say(f"the configuration differs from the one in {out_dir}: starting afresh")
            shutil.rmtree(checkpoints)
    if checkpoints.exists():
        say(f"resuming from the checkpoints in {checkpoints}")
    write_json(out_dir / "config.json", config)
    return out_dir


def output_files(result: Mapping[str, Any]) -> list[str]:
    """The files a run writes besides config.json, given its result.json (which comes last)."""
    return [*result.get("plots", []), *result.get("arrays", []), "history.csv", "result.json"]


def _delete_outputs(out_dir: Path) -> None:
    for name in output_files(_read_json(out_dir / "result.json") or {}):
        (out_dir / Path(name).name).unlink(missing_ok=True)  # .name: never outside out_dir


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or ``None`` if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
