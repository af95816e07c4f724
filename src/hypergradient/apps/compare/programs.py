"""The compiled programs of one regime, shared by every method and seed."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypergradient as hg

from .. import methods as method_names
from .space import box_constraint, lam_centre

PRUNING_CHUNKS = 4  # TPE reports the validation loss after each quarter of the training run
HYBRID_DOUBLINGS = range(-3, 4)  # the hybrid's hyper learning rates: the problem's times 2^k


class Programs:
    """The jitted programs of one regime (a :class:`~.problem.Problem`), compiled once before any clock starts."""

    def __init__(self, problem):
        self.problem = problem
        objective = problem.objective
        # the objective at s_T: with a model state (BatchNorm statistics) it reads that too
        self.val = jax.jit(lambda dyn, state, lam: dyn.objective_at(objective, state, lam))
        dyn = problem.dynamics(0)
        T = dyn.steps
        self.chunks = PRUNING_CHUNKS if T % PRUNING_CHUNKS == 0 and T >= PRUNING_CHUNKS else 1
        K = T // self.chunks

        @jax.jit
        def initial(dyn, lam):
            return dyn.initial_state(lam)

        @jax.jit
        def segment(dyn, state, lam, start):
            state, losses = dyn.rollout(state, lam, start, K)
            return state, losses, dyn.objective_at(objective, state, lam)

        self.initial, self.segment, self.K = initial, segment, K
        # One constraint, method and optimizer object per hyper learning rate, so that every pass of
        # hg.online, every hyper-step of hg.optimize (and every seed) hits their caches of compiled programs.
        self.box = box_constraint(problem.space)
        self.reverse = method_names.make("reverse")
        self.es = method_names.make("es")
        self.pes = method_names.make("pes")
        self._adam: dict[float, Any] = {}

    def adam(self, lr: float):
        """``optax.adam(lr)``, one object per ``lr``."""
        if lr not in self._adam:
            self._adam[lr] = optax.adam(lr)
        return self._adam[lr]

    def warm_up(self, methods: Sequence[str]) -> float:
        """Compile every program the methods will call; returns the seconds it took."""
        t0 = time.perf_counter()
        dyn = self.problem.dynamics(0)
        lam = lam_centre(self.problem.space)
        if {"random", "online", "pes"} & set(methods):
            self.evaluate(dyn, lam)
        if "tpe" in methods:
            state = self.initial(dyn, lam)
            jax.block_until_ready(self.segment(dyn, state, lam, jnp.asarray(0, jnp.int32)))
        lrs = {self.problem.hyper_lr} if "hypergradient" in methods else set()
        if "hybrid" in methods:
            lrs |= {self.hybrid_lr(k) for k in HYBRID_DOUBLINGS}
        for lr in sorted(lrs):
            self._warm_optimize(dyn, lam, lr)
        if "es" in methods:
            self._warm_optimize(dyn, lam, self.problem.hyper_lr, self.es)
        jax.block_until_ready(self.problem.test(self.train(dyn, lam)[0]))
        return time.perf_counter() - t0

    def hybrid_lr(self, doublings: int) -> float:
        """The hybrid's hyper learning rate: the problem's times ``2**doublings``. A few fixed values
        rather than a continuous range, so that each hyper-update is compiled once, in the warm-up."""
        return self.problem.hyper_lr * 2.0**doublings

    def _warm_optimize(self, dyn, lam, lr: float, method=None) -> None:
        """One hyper-step of ``hg.optimize`` at hyper learning rate ``lr``: compiles its hypergradient
        (Reverse-HG's, or ``method``'s), its hyper-update (Adam at ``lr`` and the box) and its final
        evaluation."""
        try:
            hg.optimize(dyn, self.problem.objective, lam, method=method or self.reverse, hyper_optimizer=self.adam(lr),
                        hyper_steps=1, constraint=self.box, progress=False)
        except hg.HyperDivergenceError:
            pass

    @staticmethod
    def train(dyn, lam):
        """s_T of one plain training run at λ, and its per-step losses."""
        return hg.dynamics.train(dyn, lam)

    def final(self, dyn, lam):
        """s_T of one plain training run at λ, ``None`` if training diverged."""
        state, losses = self.train(dyn, lam)
        return None if hg.dynamics.first_nonfinite(losses) is not None else state

    def evaluate(self, dyn, lam) -> float:
        """f(λ): one plain training run and the validation loss (``inf`` if training diverged)."""
        state = self.final(dyn, lam)
        if state is None:
            return float("inf")
        value = float(self.val(dyn, state, lam))
        return value if np.isfinite(value) else float("inf")

    def evaluate_chunked(self, dyn, lam, report: Callable[[float, int], bool]) -> float | None:
        """f(λ) in ``chunks`` pieces, ``report(value, i)`` after each but the last; ``None`` if pruned."""
        state = self.initial(dyn, lam)
        for i in range(self.chunks):
            state, losses, value = self.segment(dyn, state, lam, jnp.asarray(i * self.K, jnp.int32))
            value = float(value)
            if not (np.isfinite(value) and np.isfinite(np.asarray(losses)).all()):
                return float("inf")
            if i < self.chunks - 1 and report(value, i):
                return None
        return value
