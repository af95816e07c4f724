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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._pytree import partition, signature
from ..dynamics import Dynamics, first_nonfinite
from ..errors import HyperDivergenceError, MethodError
from ..hypergrad import ProgramCache
from ..methods.base import Method, Segmented
from ..methods.forward import Forward
from ..methods.truncated import Truncated
from ..precision import library_precision, matmul_precision
from . import checkpoint as ckpt
from . import fingerprint
from .progress import NoProgressMeter, ProgressMeter, meter_for, tick
from .offline import (
    DEFAULT_HYPER_OPTIMIZER,
    MAX_RECORDED_HPARAMS,
    OptimizeResult,
    check_common,
    divergence_message,
    hparam_size,
    hyper_update_fn,
)

CHECKPOINT_FILE = "online"


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
      method: ``hg.Forward()`` (RTHO, default) or ``hg.Truncated(k)`` (TRHO,
        backpropagating through the last ``k`` steps: ``k <= every``, or a
        multiple of ``every`` that reaches into earlier intervals, their λ
        shifted with the current one; the state ``k`` steps back is held
        fixed, so the path through ``init(λ)`` is never differentiated).
        Other methods raise ``MethodError``.
      every: Δ, the number of training steps between hyper-updates. Required
        for ``Forward``; ``Truncated(k)`` defaults it to ``k``. The run makes
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
      An :class:`~hypergradient.drivers.offline.OptimizeResult`: ``params``
      the weights the run ended with, ``hparams`` λ after the last update,
      ``value`` the objective at those (with ``k`` = number of updates), and
      ``history`` with one row per hyper-step k: ``value`` (E at the end of
      interval k, under λ_k), ``grad_norm``, ``seconds``, ``hparams`` (λ_k, the
      λ in force during interval k, when λ is small enough) and
      ``train_loss`` (every training step, length T).

    Raises:
      HyperDivergenceError: training (or the hypergradient) went non-finite;
        names the hyper-step and the training step, holds the last good λ.
      MethodError: a method other than Forward or Truncated.
    """
    method = Forward() if method is None else method
    hyper_optimizer = DEFAULT_HYPER_OPTIMIZER if hyper_optimizer is None else hyper_optimizer
    if not isinstance(method, Segmented):
        raise MethodError(
            f"online (real-time) hyperparameter optimization needs method=hg.Forward() (RTHO) or "
            f"hg.Truncated(k) (TRHO); {method!r} differentiates a whole run and cannot update λ "
            f"during it. Use hg.optimize for offline tuning with {type(method).__name__}."
        )
    if every is None:
        if isinstance(method, Truncated):
            every = method.k
        else:
            raise ValueError("online with hg.Forward() (RTHO) needs every=Δ, the training steps between updates")
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    every = int(every)
    if every > dyn.steps:
        raise ValueError(f"every={every} is longer than the training run (steps={dyn.steps}): no update would happen")
    if isinstance(method, Truncated):
        method.intervals_back(every)  # k <= Δ or a multiple of Δ
    lam = check_common(dyn, lam0, hyper_optimizer, constraint, None)
    dyn.validate(lam)
    n_updates, remainder = divmod(dyn.steps, every)
    if chunk is None:
        chunk = n_updates if checkpoint_dir is None else max(1, math.ceil(n_updates / 10))
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    chunk = int(min(chunk, n_updates))

    record = hparam_size(lam) <= MAX_RECORDED_HPARAMS
    meter = meter_for(progress)
    arrays, skeleton = partition(objective)
    programs = _programs(dyn, skeleton, arrays, method, every, hyper_optimizer, constraint, lam, record,
                         not isinstance(meter, NoProgressMeter))
    body, run_chunk, finish = programs.body, programs.run_chunk, programs.finish
    state_shape = jax.eval_shape(dyn.initial_state, lam)
    carry = programs.initial_carry(dyn, lam)
    rows: list[dict] = []
    seconds: list[float] = []
    done = 0

    path = None
    header = {
        "driver": "online",
        "method": repr(method),
        "every": every,
        "train_steps": dyn.steps,
        "weights": ckpt.spec(state_shape),
        "hparams0": fingerprint.digest(lam),
        "hyper_optimizer": fingerprint.digest(hyper_optimizer),
        "constraint": fingerprint.digest(constraint),
    }
    if checkpoint_dir is not None:
        path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_FILE)
        saved = ckpt.load(path)
        if saved is not None:
            ckpt.check_header(saved, header)
            carry = jax.tree.map(jnp.asarray, saved.restore("carry", carry))
            done = int(saved.header["step"])
            template = jax.eval_shape(lambda: jax.lax.scan(lambda c, k: body(dyn, arrays, c, k, 0), carry,
                                                           jnp.arange(done))[1])
            if done:
                rows = [saved.restore("rows", jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template))]
                seconds = list(saved.restore_dict("seconds").get("seconds", np.zeros(done)))

    def stacked_rows():
        return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *rows) if rows else None

    run = meter.open(n_updates, done)
    try:
        while done < n_updates:
            ks = jnp.arange(done, min(done + chunk, n_updates), dtype=jnp.int32)
            t0 = time.perf_counter()
            new_carry, out_rows = jax.block_until_ready(run_chunk(dyn, arrays, carry, ks, jnp.int32(run)))
            dt = time.perf_counter() - t0
            rows.append(jax.tree.map(np.asarray, out_rows))
            seconds.extend([dt / len(ks)] * len(ks))
            if not bool(new_carry.ok):
                _raise_divergence(stacked_rows(), new_carry, lam, every, dyn.steps, seconds, path)
            carry = new_carry
            done += len(ks)
            if path is not None:
                ckpt.save(path, {"carry": carry, "rows": stacked_rows(), "seconds": {"seconds": np.asarray(seconds)}},
                          {**header, "step": done})
    finally:
        meter.close(run)

    state, tail_losses, value = finish(dyn, arrays, carry)
    all_rows = stacked_rows()
    train_loss = np.concatenate([all_rows["train_loss"].reshape(-1), np.asarray(tail_losses)])
    step = first_nonfinite(train_loss)
    if step is not None or not np.isfinite(float(value)):
        raise HyperDivergenceError(
            divergence_message("online", n_updates, step, dyn.steps,
                               "the steps after the last update (or the final objective) are not finite",
                               n_updates - 1),
            n_updates, step, carry.good_hparams, _history(all_rows, seconds, train_loss), _best(carry),
        )
    best, best_value, best_step = _best(carry)
    if float(value) < best_value or best_step < 0:
        best, best_value, best_step = carry.hparams, float(value), n_updates
    return OptimizeResult(carry.hparams, dyn.model(state.params), float(value),
                          _history(all_rows, seconds, train_loss), n_updates, False, best, best_value, best_step)


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

    def outer(dyn, arrays, w, lam, k):
        objective, model = skeleton.combine(arrays), dyn.model(w)
        return objective(model, lam, k) if with_k else objective(model, lam)

    w0 = jax.eval_shape(dyn.initial_params, lam)
    out = jax.eval_shape(lambda w, lam: outer(dyn, arrays, w, lam, jnp.zeros((), jnp.int32)), w0, lam)
    if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"objective must return a floating-point scalar, it returned {out}")
    update = hyper_update_fn(hyper_optimizer, constraint)

    def initial_carry(dyn, lam):
        best = (lam, jnp.asarray(jnp.inf, jax.tree.leaves(lam)[0].dtype), jnp.asarray(-1, jnp.int32))
        return Carry(method.start(dyn, lam, every), lam, lam, best, hyper_optimizer.init(lam), jnp.asarray(True))

    def body(dyn, arrays, carry: Carry, k, meter_index):
        energy = lambda w, lam: outer(dyn, arrays, w, lam, k)  # noqa: E731
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
        gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g)))
        row = {"value": value, "grad_norm": gnorm, "train_loss": losses}
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
        return state, losses, outer(dyn, arrays, state.params, carry.hparams, jnp.asarray(n_updates, jnp.int32))

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


def _raise_divergence(rows, carry, lam0, every, steps, seconds, path):
    bad = ~(np.isfinite(rows["value"]) & np.isfinite(rows["grad_norm"])
            & np.isfinite(rows["train_loss"]).all(axis=1))
    k = int(np.argmax(bad))
    within = first_nonfinite(rows["train_loss"][k])
    step = None if within is None else k * every + within
    cause = "the training loss is not finite" if within is not None else "the objective or its hypergradient is not finite"
    note = (f" The checkpoint in {os.path.dirname(path)} holds the state before the chunk that diverged."
            if path else "")
    train_loss = rows["train_loss"][:k].reshape(-1)
    kept = {key: (jax.tree.map(lambda a: a[:k], v) if key == "hparams" else v[:k]) for key, v in rows.items()}
    raise HyperDivergenceError(
        divergence_message("online", k, step, steps, cause, k - 1 if k > 0 else None, note),
        k, step, carry.good_hparams, _history(kept, seconds[:k], train_loss), _best(carry),
    )


def _best(carry: Carry) -> tuple:
    """(λ, objective, hyper-step) of the lowest objective the loop has seen."""
    return carry.best[0], float(carry.best[1]), int(carry.best[2])
