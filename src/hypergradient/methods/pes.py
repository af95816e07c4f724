"""PES and NRES: evolution strategies over truncated unrolls, for ``hg.online`` every Δ steps.

Each of the 2N antithetic particles keeps its own training state from step 0, beside the
unperturbed run that trains the model. In segment j (steps jΔ .. (j+1)Δ − 1), pair i runs under
λ_j ± σz_{i,j}, and the estimate at the segment's end is

    g_j = (1/N) Σ_i ξ_i (E_i⁺ − E_i⁻) / (2σ)

with E_i^± the objective at the particles' states under λ_j ± σz_{i,j}.

PES (Vicol, Metz, Sohl-Dickstein, ICML 2021) draws fresh z_{i,j} every segment and accumulates
ξ_i = Σ_{k≤j} z_{i,k}. The scaling: a particle's state depends on λ + σz_k for every k ≤ j, so
for the objective as a function of those J copies of λ, Stein's lemma over the independent z_k
gives ∂/∂λ E[E(λ + σz_1, …, λ + σz_j)] = E[(Σ_k z_k) E⁺] / σ; the mirrored particle contributes
−ξ and E⁻, and averaging the two gives the ξ(E⁺ − E⁻)/(2σ) above. This is unbiased for the
gradient of the smoothed objective at the segment's end with respect to a λ held over the whole
past (the derivative RTHO carries exactly), where Truncated is biased towards short horizons;
its variance grows with j, as ξ does.

NRES, noise-reuse ES (Li, Wu, Vicol, Metz, Sohl-Dickstein et al., 2023), draws z_i once, at the
start, and reuses it in every segment: ξ_i = z_i. It estimates the gradient of the objective
smoothed along one shared direction per particle, which for a quadratic objective is the same
as PES's, with a variance that does not grow with the number of segments.

With one segment of length T both are :class:`~hypergradient.ES` with the same key, draw for
draw. Cost: 2N + 1 training runs (one vmapped batch of 2N), memory (2N + 1)·d plus N·m for ξ.
The draws of segment j depend on the key, j and λ_j's bits, so a run resumed from a checkpoint
repeats them. λ moves between segments in ``hg.online``: the estimates are then those of a
slowly moving λ, as RTHO's are.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import _perturb
from .base import Segmented, solution
from .es import failure


class Particles(NamedTuple):
    """The carry of PES and NRES: the unperturbed state s_t, the 2N particles' states (stacked,
    + then −), and ξ (PES: the perturbations accumulated so far; NRES: the one drawn at start)."""

    state: Any
    particles: Any
    noise: Any


class _Unrolled(_perturb.Perturbed, Segmented):
    """What PES and NRES share: the particles, their segment and the whole-run case."""

    reuse: bool  # NRES

    def start(self, dyn, lam, length: int) -> Particles:
        z = _perturb.draw(self.key, lam, self.pairs, 0)
        particles = jax.vmap(dyn.initial_state)(_perturb.antithetic(lam, z, self.sigma))
        noise = z if self.reuse else jax.tree.map(jnp.zeros_like, z)
        return Particles(dyn.initial_state(lam), particles, noise)

    def state(self, carry: Particles):
        return carry.state

    def segment(self, dyn, objective, carry: Particles, lam, start, length: int):
        carry, value, grad, losses, _ = self._segment(dyn, objective, carry, lam, start, length)
        return carry, value, grad, losses

    def _segment(self, dyn, objective, carry: Particles, lam, start, length: int):
        if self.reuse:
            z = xi = carry.noise
        else:
            z = _perturb.draw(self.key, lam, self.pairs, start // length)
            xi = jax.tree.map(jnp.add, carry.noise, z)
        particles, grad, stats = _perturb.population_step(dyn, objective, carry.particles, lam, z, xi, self.sigma,
                                                          start, length)
        state, losses = dyn.rollout(carry.state, lam, start, length)
        return Particles(state, particles, xi), objective(state, lam), grad, losses, stats

    def value_and_grad(self, dyn, objective, lam):
        carry, value, grad, losses, stats = self._segment(dyn, objective, self.start(dyn, lam, dyn.steps), lam, 0,
                                                          dyn.steps)
        return solution(value, grad, carry.state, losses, stats)

    def failure(self, result, stats):
        return failure(self, result, stats)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class PES(_Unrolled):
    """Persistent evolution strategies: fresh perturbations every segment, accumulated in ξ.

    Args:
      sigma: σ, the scale of the perturbations of λ (in λ's units).
      pairs: N, the antithetic pairs (2N particles).
      key: an int seed or a ``jax.random`` key.

    In ``hg.online(..., method=hg.PES(...), every=Δ)`` each update uses the estimate at the end of
    its segment; the particles and ξ are part of the checkpointed carry. A whole-run
    ``hg.value_and_grad`` is :class:`~hypergradient.ES`. ``stats`` as ES's.
    """

    reuse = False


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class NRES(_Unrolled):
    """Noise-reuse evolution strategies: one perturbation per particle for the whole run.

    Args:
      sigma: σ, the scale of the perturbations of λ (in λ's units).
      pairs: N, the antithetic pairs (2N particles).
      key: an int seed or a ``jax.random`` key.

    Used as :class:`~hypergradient.PES` is; its estimate at segment j uses that segment's objectives only, with
    a variance that does not grow with j.
    """

    reuse = True
