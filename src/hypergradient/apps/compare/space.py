"""The search space: each entry of λ with its box, and λ from a sampler's numbers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Axis:
    """One entry of λ: ``shape`` numbers, each in ``[lo, hi]`` in natural units.

    λ stores ``log x`` (``scale="log"``: sampled log-uniformly) or ``logit x``
    (``scale="logit"``: sampled uniformly), so that gradient steps are
    unconstrained apart from the box.
    """

    label: str
    shape: tuple[int, ...]
    lo: float
    hi: float
    scale: str  # "log" | "logit"

    def to_lam(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self.scale == "log":
            return np.log(x)
        x = np.clip(x, 1e-6, 1 - 1e-6)
        return np.log(x / (1 - x))

    def bounds(self) -> tuple[float, float]:
        """The box in λ's units."""
        lo, hi = self.to_lam(np.array([self.lo, self.hi]))
        return float(lo), float(hi)

    def centre(self) -> float:
        if self.scale == "log":
            return float(np.sqrt(self.lo * self.hi))
        return 0.5 * (self.lo + self.hi)

    def names(self) -> list[str]:
        if not self.shape:
            return [self.label]
        return [f"{self.label}[{','.join(map(str, idx))}]" for idx in np.ndindex(*self.shape)]


Space = Mapping[str, Axis]


def space_size(space: Space) -> int:
    return sum(int(np.prod(a.shape, dtype=int)) for a in space.values())


def _constant(space: Space, x: Mapping[str, float]) -> dict:
    """λ holding ``x[k]`` (natural units) at every position of entry ``k``."""
    return {k: jnp.full(a.shape, a.to_lam(np.array(x[k])), jnp.float32) for k, a in space.items()}


def lam_centre(space: Space) -> dict:
    return _constant(space, {k: a.centre() for k, a in space.items()})


def suggest_start(trial, space: Space) -> dict:
    """A starting λ from the trial: one number per entry (``start_LABEL``, log-uniform or uniform over
    its box), the same at every step and layer."""
    return _constant(space, {k: trial.suggest_float(f"start_{a.label}", a.lo, a.hi, log=a.scale == "log")
                             for k, a in space.items()})


def lam_from_params(space: Space, params: Mapping[str, float]) -> dict:
    """λ from an Optuna trial's parameters (natural units)."""
    out = {}
    for k, a in space.items():
        x = np.array([params[n] for n in a.names()], np.float64).reshape(a.shape)
        out[k] = jnp.asarray(a.to_lam(x), jnp.float32)
    return out


def suggest(trial, space: Space) -> dict:
    """Draw every number of λ from the trial (log-uniform or uniform over the box)."""
    params = {}
    for a in space.values():
        for n in a.names():
            params[n] = trial.suggest_float(n, a.lo, a.hi, log=a.scale == "log")
    return lam_from_params(space, params)


def box_constraint(space: Space) -> Callable:
    """The projection of λ onto the search box (traceable)."""
    bounds = {k: a.bounds() for k, a in space.items()}

    def project(lam):
        return {k: jnp.clip(v, *bounds[k]).astype(v.dtype) for k, v in lam.items()}

    return project
