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
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hypergradient.errors import ExperimentError

from ..terminal import say

LOCK_FILE = ".lock"
#: Where a rerun with another configuration moves the previous run: ``OUT/previous-<timestamp>``.
PREVIOUS = "previous-"


class FolderError(ExperimentError):
    """The results folder cannot be used: another process holds it."""


@contextlib.contextmanager
def claim(out_dir: Path) -> Iterator[Path]:
    """Create ``out_dir`` and hold it while the block runs: a second run into it meanwhile is refused.

    The hold is an ``flock`` on ``out_dir/.lock``, which the system releases when this process
    ends, however it ends (kill -9 included); the file holds the pid, for the refusal's message.

    Raises:
      FolderError: another process holds ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644), "r+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read().strip() or "unknown"
            raise FolderError(f"{out_dir} is in use by another run (pid {holder}); wait for it to end, "
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
    """Write ``config.json`` in ``out_dir``, once what another configuration left there is moved aside.

    With the same configuration everything is kept. With another one, the previous run (its
    config.json, history.csv, result.json and the files it lists) moves to
    ``out_dir/previous-<timestamp>``, its checkpoints with it unless only fields in
    ``resumable_changes`` differ (a rerun resumes from them); nothing is deleted. All this happens
    before config.json is rewritten, so a run killed at any moment never leaves a config.json
    beside another configuration's results.
    """
    checkpoints = out_dir / "checkpoints"
    before, now = _read_json(out_dir / "config.json"), jsonable(config)
    if before != now:
        resumable = before is not None and set(before) == set(now) and all(
            before[k] == v for k, v in now.items() if k not in resumable_changes)
        moved = _move_aside(out_dir, with_checkpoints=not resumable)
        if moved is not None:
            changed = sorted(k for k in set(before or {}) | set(now) if (before or {}).get(k) != now.get(k))
            say(f"the configuration differs from the one in {out_dir} ({', '.join(changed) or 'unreadable'}): "
                f"moved the previous run to {moved}" + ("" if resumable else "; starting afresh"))
    if checkpoints.exists():
        say(f"resuming from the checkpoints in {checkpoints}")
    write_json(out_dir / "config.json", config)
    return out_dir


def _move_aside(out_dir: Path, with_checkpoints: bool) -> Path | None:
    """Move the previous run's files (and its checkpoints if ``with_checkpoints``) to a new
    ``out_dir/previous-<timestamp>``, config.json last; the folder, or ``None`` if there was nothing."""
    names = [Path(name).name for name in output_files(_read_json(out_dir / "result.json") or {})]  # never outside
    names += ["checkpoints"] if with_checkpoints else []
    present = [name for name in dict.fromkeys(names) if (out_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = out_dir / f"{PREVIOUS}{stamp}", 1
    while target.exists():
        n += 1
        target = out_dir / f"{PREVIOUS}{stamp}-{n}"
    target.mkdir()
    for name in [*present, "config.json"]:  # config.json last: until it moves, the rest is still its run's
        if (out_dir / name).exists():
            os.replace(out_dir / name, target / name)
    return target


def output_files(result: Mapping[str, Any]) -> list[str]:
    """The files a run writes besides config.json, given its result.json (which comes last)."""
    return [*result.get("plots", []), *result.get("arrays", []), "history.csv", "result.json"]


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or ``None`` if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
