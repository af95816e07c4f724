"""ES: the gradient of the Gaussian-smoothed objective, from antithetic perturbed training runs.

    f_σ(λ) = E_z f(λ + σz),  z ~ N(0, I)
    ∇f_σ(λ) = E_z[z (f(λ + σz) − f(λ − σz))] / (2σ)
            ≈ (1/N) Σ_i z_i (f(λ + σz_i) − f(λ − σz_i)) / (2σ)

Each f(λ ± σz_i) is a whole training run from init(λ ± σz_i), objective included; the 2N runs go
as one vmapped batch, and one more, unperturbed, run gives f(λ) and the Solution's weights and
losses. Nothing is differentiated, so the estimate is finite where the exact hypergradient
overflows (chaotic or very long runs) and describes the trend over a scale σ where the objective
jumps (relu, max-pool). It is unbiased for ∇f_σ, which equals ∇f for a quadratic f; its variance
falls as 1/N and grows with the number m of hyperparameters. Every run sees the same batches and
step keys (common random numbers).
"""

from __future__ import annotations

import dataclasses

import jax

from ..errors import DivergenceError, Failure
from . import _perturb
from .base import Method, solution


def failure(method, result: Failure, stats: dict) -> Exception | None:
    """The error for a perturbed run that diverged while the unperturbed one stayed finite."""
    if result == Failure.GRAD_NONFINITE and stats.get("diverged_runs", 0) > 0:
        return DivergenceError(
            f"{type(method).__name__}: {stats['diverged_runs']} of {stats['runs']} perturbed training runs diverged "
            f"(NaN or inf) while the unperturbed run stayed finite, so the estimate is not finite; a smaller sigma "
            f"(now {method.sigma}) keeps the perturbed runs in the range that trains")
    return None


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ES(_perturb.Perturbed, Method):
    """Antithetic evolution strategies over the whole run: 2N + 1 training runs, no derivative.

    Args:
      sigma: σ, the scale of the perturbations of λ (in λ's units: 0.1 on a log learning rate is
        ±10%); the estimate is the gradient of f smoothed over that scale.
      pairs: N, the antithetic pairs (2N perturbed runs).
      key: an int seed or a ``jax.random`` key. The draws depend on the key and on λ's bits: the
        same (key, λ) repeats them, and each hyper-step of ``hg.optimize`` gets fresh ones.

    ``stats``: ``variance`` (the estimated variance of the returned gradient summed over λ's
    components, from the spread of the N per-pair estimates; NaN for N = 1), ``runs`` (2N) and
    ``diverged_runs``. A perturbed run that diverges makes the estimate NaN and ``hypergrad`` raise
    ``DivergenceError`` naming how many did.
    """


    def value_and_grad(self, dyn, objective, lam):
        z = _perturb.draw(self.key, lam, self.pairs, 0)
        particles = jax.vmap(dyn.initial_state)(_perturb.antithetic(lam, z, self.sigma))
        _, grad, stats = _perturb.population_step(dyn, objective, particles, lam, z, z, self.sigma, 0, dyn.steps)
        state, losses = dyn.rollout(dyn.initial_state(lam), lam, 0, dyn.steps)
        return solution(objective(state, lam), grad, state, losses, stats)

    def failure(self, result, stats):
        return failure(self, result, stats)
