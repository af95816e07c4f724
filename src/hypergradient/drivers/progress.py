"""Progress of a driver's hyper-steps, reported from the host or from inside a compiled loop.

The model is diffrax's ``progress_meter``: a driver takes a :class:`ProgressMeter` object, opens a
run on it, which returns an index, and ticks that index once per hyper-step. A compiled loop ticks
through ``jax.debug.callback(tick, index, value)`` with the index as a traced argument, so one
cached program serves every run; the host looks the run up by index, under a lock.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
from typing import Any


class ProgressMeter:
    """Base of the meters: subclasses say how a run starts, advances and ends."""

    def _start(self, total: int, initial: int, desc: str) -> Any:
        return None

    def _step(self, run: Any, value: float) -> None:
        pass

    def _end(self, run: Any) -> None:
        pass

    def open(self, total: int, initial: int = 0, desc: str = "hyper-steps") -> int:
        """Start reporting a run of ``total`` hyper-steps (``initial`` already done); its index."""
        index = next(_indices)
        with _lock:
            _runs[index] = (self, self._start(total, initial, desc))
        return index

    def close(self, index: int) -> None:
        with _lock:
            meter, run = _runs.pop(index, (None, None))
        if meter is not None:
            meter._end(run)

    @contextlib.contextmanager
    def running(self, total: int, initial: int = 0, desc: str = "hyper-steps"):
        """:meth:`open` for the ``with`` block, which it closes however it ends; yields the index."""
        index = self.open(total, initial, desc)
        try:
            yield index
        finally:
            self.close(index)


def tick(index, value) -> None:
    """One hyper-step of run ``index`` is done, with objective ``value`` (callable from a compiled
    loop through ``jax.debug.callback``)."""
    with _lock:
        meter, run = _runs.get(int(index), (None, None))
    if meter is not None:
        meter._step(run, float(value))


_lock = threading.Lock()
_runs: dict[int, tuple[ProgressMeter, Any]] = {}
_indices = itertools.count()


class NoProgressMeter(ProgressMeter):
    """Reports nothing."""


class TqdmProgressMeter(ProgressMeter):
    """A tqdm bar on stderr with the latest objective."""

    def _start(self, total, initial, desc):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def _step(self, bar, value):
        bar.set_postfix(objective=f"{value:.6g}")
        bar.update(1)

    def _end(self, bar):
        bar.close()


class TextProgressMeter(ProgressMeter):
    """A line on stderr at most every ``every_seconds`` (for logs, CI and notebooks): hyper-step,
    objective, time per hyper-step and time left.

    The rate leaves out the first hyper-step of the process, which compiles the programs (a 40 s
    run would otherwise be predicted to take twenty minutes); until a second one ends, the line
    gives the first one's time instead."""

    def __init__(self, every_seconds: float = 10.0):
        self.every_seconds = every_seconds

    def _start(self, total, initial, desc):
        now = time.monotonic()
        return {"total": total, "done": initial, "desc": desc, "start": now, "last": now, "warm": None}

    def _step(self, run, value):
        run["done"] += 1
        now = time.monotonic()
        if run["warm"] is None:  # the first step: its time is mostly compilation
            run["warm"] = (now, run["done"])
        if now - run["last"] < self.every_seconds:
            return
        run["last"] = now
        head = f"{run['desc']} {run['done']}/{run['total']}: objective {value:.6g}"
        warm_time, warm_done = run["warm"]
        if run["done"] == warm_done:
            print(f"{head}, first step {now - run['start']:.3g} s (compilation included)", file=sys.stderr, flush=True)
            return
        rate = (now - warm_time) / (run["done"] - warm_done)
        left = rate * (run["total"] - run["done"])
        print(f"{head}, {rate:.3g} s/step, {left:.0f} s left", file=sys.stderr, flush=True)


def meter_for(progress: bool | ProgressMeter | None) -> ProgressMeter:
    """The meter a driver uses: a given meter as it is; ``True`` a tqdm bar, ``False`` none;
    ``None`` a tqdm bar when stderr is a terminal and a line every 10 s otherwise."""
    if isinstance(progress, ProgressMeter):
        return progress
    if progress is None:
        return TqdmProgressMeter() if sys.stderr.isatty() else TextProgressMeter()
    return TqdmProgressMeter() if progress else NoProgressMeter()
