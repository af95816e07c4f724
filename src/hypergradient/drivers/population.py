"""K tuning runs as one program: ``hg.optimize(..., population_axis=0)``.

Every leaf of λ0 carries the population on ``population_axis``; each hyper-step is one compiled,
vmapped hypergradient of all K members and one vmapped hyper-update, so K runs cost one program
(and run sharded when λ0 is sharded along that axis, e.g. ``hg.data.shard(lam0, mesh, "pop")``).
A member whose training diverges keeps its λ (it is not updated) and scores inf; the run stops
only when every member has diverged. A member whose objective is finite but runaway (see
:func:`scores`) scores inf as well, in the history, the best member and ``population_values``; its
λ keeps being updated while its hypergradient is finite. The method is resolved for all members at once
(``Method.resolve_members``: Reversible sizes its buffer for the member that needs most), and a
member's method failure is raised, or warned about, naming the member, as ``hg.hypergrad`` would.
"""

from __future__ import annotations

import time
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .._lam_checks import check_fits
from .._pytree import partition, signature, tree_norm
from ..errors import Failure, HyperDivergenceError
from ..hypergrad import ProgramCache, trained_objective, value_and_grad
from ..precision import matmul_precision
from . import checkpoint as ckpt
from .core import OptimizeResult, Store, Tuning, as_hparams, check_arguments, jitted_update, problem_header
from .progress import meter_for, tick

_programs = ProgramCache(16)

#: An objective beyond this magnitude is a run that diverged without overflowing (float32, the
#: narrowest dtype a run trains in, overflows at 3.4e38; no working loss comes near).
RUNAWAY_ABSOLUTE = 1e30
#: An objective this many times the population's median magnitude has left the region the other
#: members train in.
RUNAWAY_RELATIVE = 1e6


def optimize_population(dyn, objective, lam0, axis: int, *, method, hyper_optimizer, hyper_steps: int, constraint,
                        callback, checkpoint_dir, progress) -> OptimizeResult:
    """The population form of :func:`hypergradient.optimize`, which calls it with its own arguments."""
    if callback is not None:
        raise ValueError("optimize: population_axis runs K members at once and takes no callback")
    lam = as_hparams(lam0)
    check_arguments(dyn, jax.tree.map(lambda x: jnp.take(x, 0, axis=axis), lam), hyper_optimizer, constraint, None)
    lam = jax.tree.map(lambda x: jnp.moveaxis(x, axis, 0), lam)
    k_members = _members(lam, axis)
    first = _member(lam, 0)
    dyn.validate(first)
    method = method.resolve_members(dyn, [_member(lam, i) for i in range(k_members)], objective)
    method.check(dyn)
    arrays, skeleton = partition(objective)
    step, final = _programs_for(dyn, skeleton, arrays, method, first)
    update = jitted_update(hyper_optimizer, constraint, members=True)
    state = Tuning.start(lam, jax.vmap(hyper_optimizer.init)(lam), first, record=False)
    store = Store(checkpoint_dir, "population",
                  lambda: {"members": k_members, **problem_header(dyn, lam, hyper_optimizer, constraint, member=first)})
    start = state.resume(store)
    with meter_for(progress).running(hyper_steps, min(start, hyper_steps)) as run, \
            ckpt.Periodic(store.path, partial(state.save, store), start) as saving:
        for k in range(start, hyper_steps):
            t0 = time.perf_counter()
            sol = step(dyn, arrays, state.hparams)
            _raise_failures(method, sol, k)
            ok = ~np.asarray(sol.diverged)
            if not ok.any():
                raise HyperDivergenceError(
                    f"population: every one of the {k_members} members diverged at hyper-step {k}; error.hparams "
                    "holds their λ before it", k, None, jax.tree.map(np.asarray, state.hparams),
                    state.final_history(), state.best)
            values = scores(np.asarray(sol.value, np.float64), ok)
            i = int(np.argmin(values))
            new_lam, new_opt = update(sol.grad, state.opt_state, state.hparams)
            norms = np.asarray(jax.vmap(tree_norm)(sol.grad))
            with ckpt.sigint_held():
                state.best = state.best.offer(jax.tree.map(np.asarray, _member(state.hparams, i)), values[i], k)
                state.record(values, norms, time.perf_counter() - t0)
                state.hparams = _where_members(ok, new_lam, state.hparams)
                state.opt_state = _where_members(ok, new_opt, state.opt_state)
                saving.done(k + 1, last=k + 1 == hyper_steps)
            tick(run, float(values[i]))
    return _result(state, dyn, arrays, final)


def _members(lam, axis: int) -> int:
    """K, the size of every leaf's leading axis (the population axis, moved there)."""
    sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(lam)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"population_axis={axis}: every leaf of λ0 needs that axis, of one size K; got leading "
                         f"sizes {sorted(map(str, sizes))}")
    return sizes.pop()


def _member(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


def _result(state: Tuning, dyn, arrays, final) -> OptimizeResult:
    """The best member's result, from one plain training run of every member at its final λ.

    A member scores inf where that run is not finite or its objective runaway (:func:`scores`),
    and where its last hyper-step diverged: it kept the λ of that step, whose training may be
    finite while its hypergradient was not."""
    (params, held), values, losses = final(dyn, arrays, state.hparams)
    ok = np.isfinite(np.asarray(losses)).all(axis=1)
    if state.history["value"]:
        ok &= np.isfinite(np.asarray(state.history["value"][-1], np.float64))
    values = scores(np.asarray(values, np.float64), ok)
    i = int(np.argmin(values))
    member, steps = _member(state.hparams, i), len(state.history["value"])
    best = state.best.offer(member, values[i], steps)
    held = _member(held, i)
    return OptimizeResult(member, dyn.model(_member(params, i), held), float(values[i]), state.final_history(), steps,
                          False, *best, values, held)


def scores(values: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The members' objectives as reported: inf where a member diverged (``~ok``), where its
    objective is not finite, and where it is runaway, ``|f|`` > ``RUNAWAY_ABSOLUTE`` or
    ``|f|`` > ``RUNAWAY_RELATIVE`` × the median ``|f|`` of the finite members (where there are three or
    more, so that one runaway member cannot set the median, and the median is not 0)."""
    size = np.abs(values)
    ok = ok & np.isfinite(values) & (size <= RUNAWAY_ABSOLUTE)
    median = np.median(size[ok]) if ok.sum() >= 3 else 0.0
    if median > 0:
        ok &= size <= RUNAWAY_RELATIVE * median
    return np.where(ok, values, np.inf)


def _where_members(ok, new, old):
    """``new`` for the members where ``ok``, ``old`` elsewhere (leaves without the member axis: ``new``)."""
    k = len(ok)

    def pick(n, o):
        if n.ndim == 0 or n.shape[0] != k:
            return n
        return jnp.where(jnp.asarray(ok).reshape((k,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(pick, new, old)


def _programs_for(dyn, skeleton, arrays, method, first):
    """Two programs over every member, compiled once per problem: the hypergradients
    ``(dyn, arrays, λ) -> Solution`` and the final evaluation ``(dyn, arrays, λ) -> (w_T, f, losses)``."""

    def build():
        check_fits(dyn, lambda s, lam: dyn.objective_at(skeleton.combine(arrays), s, lam), first)

        def per_member(fn):
            return jax.jit(lambda d, a, lam: jax.vmap(lambda l: fn(d, skeleton.combine(a), l))(lam))

        return (per_member(lambda d, o, l: value_and_grad(d, o, l, method)), per_member(trained_objective))

    key = (signature(dyn), skeleton, signature(arrays), method, signature(first), matmul_precision())
    return _programs.get_or_build(key, build)


def _raise_failures(method, sol, hyper_step: int) -> None:
    """Raise a member's method failure (a Reversible buffer too small for its λ, say), naming the
    member; warn once per caveat, naming the members it concerns."""
    codes = np.asarray(sol.result).reshape(-1)
    caveats = {}
    for m in np.flatnonzero(codes != Failure.OK):
        error = method.failure(Failure(int(codes[m])), jax.tree.map(lambda x: np.asarray(x)[m], sol.stats))
        if isinstance(error, Warning):
            caveats.setdefault(type(error), (error, []))[1].append(int(m))
        elif error is not None:
            error.args = (f"population member {m}, hyper-step {hyper_step}: {error.args[0]}", *error.args[1:])
            raise error
    for error, members in caveats.values():
        warnings.warn(type(error)(f"population members {members}: {error}"), stacklevel=4)
