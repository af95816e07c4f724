"""Real-time hyperparameter optimization: λ updated every Δ steps of one training run.

Franceschi, Donini, Frasconi, Pontil (ICML 2017), section 4. One protocol for both algorithms:
every Δ steps the method runs its own ``segment`` (the code a whole-run hypergradient runs once,
with Δ = T), and λ takes one hyper-step from the segment's hypergradient::

    carry = method.start(s_0, λ)
    for j = 0..T/Δ-1:   carry, E, g = method.segment(carry, λ, steps jΔ..(j+1)Δ-1)
                        λ ← P(λ + optimizer(g))

RTHO (Algorithm 1, ``method=Forward()``): the carry holds the tangent Z_t = ∂s_t/∂λ, never reset,
so g = ∂E/∂s_t · Z_t + ∂E/∂λ. TRHO (``method=Truncated(k)``): each segment
backpropagates through the last k steps from the state k steps back, held fixed (k ≤ Δ, or
k = rΔ reaching into the r − 1 intervals before, see :mod:`~hypergradient.methods.truncated`).
PES and NRES (``method=PES(...)``, ``NRES(...)``): the carry holds 2N perturbed particles and their
accumulated perturbations, and g is an evolution-strategy estimate (:mod:`~hypergradient.methods.pes`).

The run is one ``lax.scan`` over hyper-steps, with the optax update and the projection P inside
it. RTHO costs ~(1 + c·m)× a training run and m·d memory (m hyperparameters); TRHO
~(1 + 2k/Δ)× for k ≤ Δ, ~3k/Δ× beyond (the earlier intervals run again), and k·d. The compiled
loop is cached: calling ``online`` again on the same problem (the same functions, method, Δ,
hyper-optimizer and constraint objects, and shapes) compiles nothing.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._checks import check_int
from .._lam_checks import check_fits
from .._pytree import partition, signature, tree_norm
from ..dynamics import Dynamics, first_nonfinite, model_state
from ..errors import HyperDivergenceError, MethodError
from ..hypergrad import ProgramCache
from ..methods.base import Method, Segmented
from ..methods.forward import Forward
from ..methods.truncated import Truncated
from ..precision import library_precision, matmul_precision
from . import fingerprint
from .core import (
    DEFAULT_HYPER_OPTIMIZER,
    Best,
    OptimizeResult,
    Store,
    check_arguments,
    divergence_message,
    hyper_update,
    on_device,
    problem_header,
    recorded,
)
from .progress import NoProgressMeter, ProgressMeter, meter_for, tick


class Carry(NamedTuple):
    """What the run carries from one hyper-step to the next."""

    inner: Any  # the method's carry: s_t, and Z_t = ∂s_t/∂λ for RTHO
    hparams: Any  # λ
    good_hparams: Any  # λ of the last hyper-step whose segment was finite
    best: Any  # (λ, objective, hyper-step) of the lowest objective seen
    opt_state: Any  # the hyper-optimizer's state
    ok: jax.Array  # every hyper-step so far was finite


def _takes_step_index(objective: Callable) -> bool:
    """Whether the objective is ``(w, λ, k)`` (three required positional parameters)."""
    try:
        params = inspect.signature(objective).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [
        p for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(required) >= 3


def online(
    dyn: Dynamics,
    objective: Callable[..., jax.Array],
    lam0: Any,
    method: Method | None = None,
    every: int | None = None,
    hyper_optimizer: optax.GradientTransformation | None = None,
    constraint: Callable[[Any], Any] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    chunk: int | None = None,
    progress: bool | ProgressMeter | None = None,
) -> OptimizeResult:
    """Tune λ during one training run, updating it every ``every`` steps (RTHO / TRHO).

    Args:
      dyn: the training run (its ``steps`` T is the length of the one run).
      objective: ``(w, λ) -> scalar``, or ``(w, λ, k) -> scalar`` where ``k``
        is the hyper-step index (0, 1, ...; a traced int), for example to
        draw validation minibatch ``k`` (``hg.Batches(...)(k)``). An objective
        with three required positional parameters gets ``k``.
      lam0: the initial hyperparameters.
      method: ``hg.Forward()`` (RTHO, default), ``hg.Truncated(k)`` (TRHO,
        backpropagating through the last ``k`` steps: ``k <= every``, or a
        multiple of ``every`` that reaches into earlier intervals, their λ
        shifted with the current one; the state ``k`` steps back is held
        fixed, so the path through ``init(λ)`` is never differentiated), or
        ``hg.PES(...)`` / ``hg.NRES(...)`` (evolution strategies over the
        truncations, no derivative taken). Other methods raise ``MethodError``.
      every: Δ, the number of training steps between hyper-updates. Required
        except for ``Truncated(k)``, which defaults it to ``k``. The run makes
        ⌊T/Δ⌋ hyper-updates, at steps Δ, 2Δ, ...; the last T mod Δ steps
        train with the final λ and no update.
      hyper_optimizer: optax optimizer over λ (default ``optax.adam(1e-2)``).
      constraint: a projection ``λ -> λ`` applied after every hyper-update
        (must be traceable: it runs inside the compiled loop).
      checkpoint_dir: save the whole carry (state, tangent, λ, optimizer
        state) and history atomically after every chunk to
        ``checkpoint_dir/online`` (orbax); a later call with the same directory
        resumes. A checkpoint of another problem is refused.
      chunk: hyper-steps per compiled call (default: all of them in one
        ``lax.scan``, or ⌈n/10⌉ with a ``checkpoint_dir``). Divergence is
        detected, and checkpoints written, between chunks. Runs with different
        chunks agree to rounding, not bitwise.
      progress: a :class:`~hypergradient.drivers.progress.ProgressMeter`, or ``True``
        (a tqdm bar per hyper-step with the objective), ``False`` (nothing), ``None``
        (a bar when stderr is a terminal, a line every 10 s otherwise).

    Returns:
      An :class:`~hypergradient.drivers.core.OptimizeResult`: ``params``
      the weights the run ended with, ``hparams`` λ after the last update,
      ``value`` the objective at those (with ``k`` = number of updates), and
      ``history`` with one row per hyper-step k: ``value`` (E at the end of
      interval k, under λ_k), ``grad_norm``, ``seconds``, ``hparams`` (λ_k, the
      λ in force during interval k, when λ is small enough) and
      ``train_loss`` (every training step, length T).

    Raises:
      HyperDivergenceError: training (or the hypergradient) went non-finite;
        names the hyper-step and the training step, holds the last good λ.
      MethodError: a method other than Forward, Truncated, PES or NRES.
    """
    method = Forward() if method is None else method
    hyper_optimizer = DEFAULT_HYPER_OPTIMIZER if hyper_optimizer is None else hyper_optimizer
    every = _interval(method, every, dyn.steps)
    lam = check_arguments(dyn, lam0, hyper_optimizer, constraint, None)
    dyn.validate(lam)
    n_updates = dyn.steps // every
    if chunk is None:
        chunk = n_updates if checkpoint_dir is None else max(1, math.ceil(n_updates / 10))
    chunk = min(check_int("chunk", chunk), n_updates)
    meter = meter_for(progress)
    arrays, skeleton = partition(objective)
    programs = _programs(dyn, skeleton, arrays, method, every, hyper_optimizer, constraint, lam, recorded(lam),
                         not isinstance(meter, NoProgressMeter))
    store = Store(checkpoint_dir, "online",
                  lambda: {"method": repr(method), "every": every,
                           **problem_header(dyn, lam, hyper_optimizer, constraint)})
    run = _Run(dyn, arrays, programs, every, programs.initial_carry(dyn, lam))
    run.resume(store)
    with meter.running(n_updates, run.done) as index:
        while run.done < n_updates:
            run.advance(min(chunk, n_updates - run.done), index, store)
    return run.result()


def _interval(method: Method, every: int | None, steps: int) -> int:
    """Δ, checked: a positive int no longer than the run, and one that ``method`` can serve."""
    if not isinstance(method, Segmented):
        raise MethodError(
            f"online (real-time) hyperparameter optimization needs method=hg.Forward() (RTHO), "
            f"hg.Truncated(k) (TRHO), hg.PES(...) or hg.NRES(...); {method!r} estimates the hypergradient of a "
            f"whole run and cannot update λ during it. Use hg.optimize for offline tuning with {type(method).__name__}."
        )
    if every is None:
        if isinstance(method, Truncated):
            every = method.k
        else:
            raise ValueError(f"online with {method!r} needs every=Δ, the training steps between "
                             "updates")
    every = check_int("every", every)
    if every > steps:
        raise ValueError(f"every={every} is longer than the training run (steps={steps}): no update would happen")
    if isinstance(method, Truncated):
        method.intervals_back(every)  # k <= Δ or a multiple of Δ
    return every


@dataclass(eq=False)
class _Run:
    """The host's side of one online run: the compiled programs and what they run on, the carry,
    and the rows and seconds of the hyper-steps done (what its checkpoint holds)."""

    dyn: Dynamics
    arrays: Any
    programs: _Programs
    every: int
    carry: Carry
    rows: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    done: int = 0

    def resume(self, store: Store) -> None:
        """Take the carry, rows and seconds stored in ``store``, if any."""
        saved = store.load()
        if saved is None:
            return
        self.carry = on_device(saved.restore("carry", self.carry))
        self.done = int(saved.header["step"])
        if self.done:
            template = jax.eval_shape(lambda: jax.lax.scan(
                lambda c, k: self.programs.body(self.dyn, self.arrays, c, k, 0), self.carry, jnp.arange(self.done))[1])
            self.rows = [saved.restore("rows", jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template))]
            self.seconds = list(saved.restore_dict("seconds").get("seconds", np.zeros(self.done)))

    def save(self, store: Store) -> None:
        store.save({"carry": self.carry, "rows": self.stacked(), "seconds": {"seconds": np.asarray(self.seconds)}},
                   step=self.done)

    def stacked(self) -> dict | None:
        return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *self.rows) if self.rows else None

    def advance(self, n: int, meter_index: int, store: Store) -> None:
        """Run the next ``n`` hyper-steps as one compiled call, then check them and checkpoint."""
        ks = jnp.arange(self.done, self.done + n, dtype=jnp.int32)
        t0 = time.perf_counter()
        carry, rows = jax.block_until_ready(
            self.programs.run_chunk(self.dyn, self.arrays, self.carry, ks, jnp.int32(meter_index)))
        dt = time.perf_counter() - t0
        self.rows.append(jax.tree.map(np.asarray, rows))
        self.seconds.extend([dt / n] * n)
        if not bool(carry.ok):
            raise self.diverged(carry, store)
        self.carry, self.done = carry, self.done + n
        if store.path is not None:
            self.save(store)

    def diverged(self, carry: Carry, store: Store) -> HyperDivergenceError:
        """The error for the first hyper-step of the last chunk that was not finite."""
        rows = self.stacked()
        bad = ~(np.isfinite(rows["value"]) & np.isfinite(rows["grad_norm"])
                & np.isfinite(rows["train_loss"]).all(axis=1))
        k = int(np.argmax(bad))
        within = first_nonfinite(rows["train_loss"][k])
        step = None if within is None else k * self.every + within
        cause = ("the training loss is not finite" if within is not None
                 else "the objective or its hypergradient is not finite")
        note = (f" The checkpoint in {store.directory} holds the state before the chunk that diverged."
                if store.path else "")
        kept = {key: (jax.tree.map(lambda a: a[:k], v) if key == "hparams" else v[:k]) for key, v in rows.items()}
        return HyperDivergenceError(
            divergence_message("online", k, step, self.dyn.steps, cause, k - 1 if k > 0 else None, note),
            k, step, carry.good_hparams, _history(kept, self.seconds[:k], rows["train_loss"][:k].reshape(-1)),
            _best(carry),
        )

    def result(self) -> OptimizeResult:
        """Train the steps after the last update, check them and the final objective; the result."""
        state, tail_losses, value = self.programs.finish(self.dyn, self.arrays, self.carry)
        rows, carry = self.stacked(), self.carry
        train_loss = np.concatenate([rows["train_loss"].reshape(-1), np.asarray(tail_losses)])
        history = _history(rows, self.seconds, train_loss)
        step = first_nonfinite(train_loss)
        if step is not None or not np.isfinite(float(value)):
            raise HyperDivergenceError(
                divergence_message("online", self.done, step, self.dyn.steps,
                                   "the steps after the last update (or the final objective) are not finite",
                                   self.done - 1),
                self.done, step, carry.good_hparams, history, _best(carry),
            )
        best = _best(carry).offer(carry.hparams, float(value), self.done)
        held = model_state(state)
        return OptimizeResult(carry.hparams, self.dyn.model(state.params, held), float(value), history, self.done,
                              False, *best, state=held)


class _Programs(NamedTuple):
    """The compiled pieces of one online run; reused by later calls on the same problem."""

    initial_carry: Callable  # (dyn, λ) -> Carry
    body: Callable  # (dyn, arrays, carry, k, meter index) -> (carry, row): one hyper-step (traceable)
    run_chunk: Callable  # (dyn, arrays, carry, ks, meter index) -> (carry, rows): jitted scan of body over ks
    finish: Callable  # (dyn, arrays, carry) -> (state, losses, value): the steps after the last update


_cache = ProgramCache(16)


def _programs(dyn, skeleton, arrays, method, every, hyper_optimizer, constraint, lam, record, ticking) -> _Programs:
    """The jitted loop of an online run, cached per (dynamics, λ shapes, objective functions and
    array shapes, method, Δ, hyper-optimizer, constraint, what is recorded, progress on/off): a second
    call on the same problem compiles nothing. The objective's functions are compared by identity, as
    ``jax.jit`` does; the hyper-optimizer and the constraint by what they compute (:mod:`fingerprint`)."""
    key = (signature(dyn), signature(lam), skeleton, signature(arrays), method, every,
           fingerprint.key(hyper_optimizer), fingerprint.key(constraint), record, ticking, matmul_precision())
    return _cache.get_or_build(key, lambda: _build(dyn, skeleton, arrays, method, every, hyper_optimizer, constraint,
                                                   lam, record, ticking))


def _build(dyn, skeleton, arrays, method, every, hyper_optimizer, constraint, lam, record, ticking) -> _Programs:
    n_updates, remainder = divmod(dyn.steps, every)
    with_k = _takes_step_index(skeleton.combine(arrays))

    def outer(dyn, arrays, final, lam, k):
        return dyn.objective_at(skeleton.combine(arrays), final, lam, *((k,) if with_k else ()))

    s0 = jax.eval_shape(dyn.initial_state, lam)
    out = jax.eval_shape(lambda s, lam: outer(dyn, arrays, s, lam, jnp.zeros((), jnp.int32)), s0, lam)
    if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"objective must return a floating-point scalar, it returned {out}")
    check_fits(dyn, lambda s, lam: outer(dyn, arrays, s, lam, jnp.zeros((), jnp.int32)), lam)
    update = hyper_update(hyper_optimizer, constraint)

    def initial_carry(dyn, lam):
        best = (lam, jnp.asarray(jnp.inf, jax.tree.leaves(lam)[0].dtype), jnp.asarray(-1, jnp.int32))
        return Carry(method.start(dyn, lam, every), lam, lam, best, hyper_optimizer.init(lam), jnp.asarray(True))

    def body(dyn, arrays, carry: Carry, k, meter_index):
        energy = lambda final, lam: outer(dyn, arrays, final, lam, k)  # noqa: E731
        inner, value, g, losses = method.segment(dyn, energy, carry.inner, carry.hparams, k * every, every)
        finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(losses))
        for leaf in jax.tree.leaves(g):
            finite &= jnp.all(jnp.isfinite(leaf))
        new_lam, new_opt = update(g, carry.opt_state, carry.hparams)
        keep = carry.ok & finite  # after a failure λ stays where it was: the last good one is kept

        def pick(a, b):
            return jax.tree.map(lambda x, y: jnp.where(keep, x, y), a, b)

        carry2 = Carry(
            inner,
            pick(new_lam, carry.hparams),
            pick(carry.hparams, carry.good_hparams),
            jax.tree.map(lambda new, old: jnp.where(keep & (value < carry.best[1]), new, old),
                         (carry.hparams, value.astype(carry.best[1].dtype), k.astype(jnp.int32)), carry.best),
            pick(new_opt, carry.opt_state),
            keep,
        )
        row = {"value": value, "grad_norm": tree_norm(g), "train_loss": losses}
        if record:
            row["hparams"] = carry.hparams
        if ticking:
            jax.debug.callback(tick, meter_index, value, ordered=True)
        return carry2, row

    @jax.jit
    def run_chunk(dyn, arrays, carry, ks, meter_index):
        with library_precision():
            return jax.lax.scan(lambda c, k: body(dyn, arrays, c, k, meter_index), carry, ks)

    @jax.jit
    @library_precision()
    def finish(dyn, arrays, carry):
        state = method.state(carry.inner)
        state, losses = (dyn.rollout(state, carry.hparams, n_updates * every, remainder)
                         if remainder else (state, jnp.zeros(0, jax.tree.leaves(lam)[0].dtype)))
        return state, losses, outer(dyn, arrays, state, carry.hparams, jnp.asarray(n_updates, jnp.int32))

    return _Programs(jax.jit(initial_carry), body, run_chunk, finish)


def _history(rows: dict, seconds: list[float], train_loss: np.ndarray) -> dict:
    h = {
        "value": np.asarray(rows["value"], np.float64),
        "grad_norm": np.asarray(rows["grad_norm"], np.float64),
        "seconds": np.asarray(seconds, np.float64),
        "train_loss": np.asarray(train_loss),
    }
    if "hparams" in rows:
        h["hparams"] = rows["hparams"]
    return h


def _best(carry: Carry) -> Best:
    """The lowest objective the loop has seen, its λ and hyper-step."""
    return Best(carry.best[0], float(carry.best[1]), int(carry.best[2]))
