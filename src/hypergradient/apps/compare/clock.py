"""Time spent by one method within its budget, and what a method's run leaves behind."""

from __future__ import annotations

import dataclasses
import time

import numpy as np


class Clock:
    """Seconds spent by one method, starting at ``offset``; ``Paused(clock)`` excludes a block."""

    def __init__(self, offset: float = 0.0):
        self.offset = offset
        self.start = time.perf_counter()
        self.excluded = 0.0

    def __call__(self) -> float:
        return self.offset + time.perf_counter() - self.start - self.excluded

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds


class Paused:
    def __init__(self, clock: Clock):
        self.clock = clock

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.clock.exclude(time.perf_counter() - self.t0)


@dataclasses.dataclass
class Run:
    """One method on one regime and seed: the trace and the final choice."""

    method: str
    regime: str
    seed: int
    trace: list  # [(seconds, best validation loss so far)], seconds within the budget
    choice: dict | None  # λ (numpy) with the best validation loss, or None if nothing finished
    evaluations: int
    note: str = ""
    test_loss: float = float("nan")
    test_error: float = float("nan")
    val_loss: float = float("nan")

    @property
    def best_val(self) -> float:
        return self.trace[-1][1] if self.trace else float("inf")


class Tracker:
    """Best validation loss so far, recorded only within the budget."""

    def __init__(self, budget: float):
        self.budget = budget
        self.trace: list = []
        self.best = float("inf")
        self.choice = None
        self.evaluations = 0

    def add(self, seconds: float, value: float, lam) -> None:
        if seconds > self.budget:
            return
        self.evaluations += 1
        if np.isfinite(value) and value < self.best:
            self.best = float(value)
            self.choice = {k: np.asarray(v) for k, v in lam.items()}
            self.trace.append((float(seconds), self.best))

    def run(self, method: str, regime: str, seed: int, note: str = "") -> Run:
        """What was tracked, as the :class:`Run` of ``method``."""
        return Run(method, regime, seed, self.trace, self.choice, self.evaluations, note)
