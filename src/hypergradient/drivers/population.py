"""K tuning runs as one program: ``hg.optimize(..., population_axis=0)``.

Every leaf of λ0 carries the population on ``population_axis``; each hyper-step is one compiled,
vmapped hypergradient of all K members and one vmapped hyper-update, so K runs cost one program
(and run sharded when λ0 is sharded along that axis, e.g. ``hg.data.shard(lam0, mesh, "pop")``).
A member whose training diverges keeps its λ (it is not updated) and scores inf; the run stops
only when every member has diverged. The method is resolved for all members at once
(``Method.resolve_members``: Reversible sizes its buffer for the member that needs most), and a
member's method failure is raised, or warned about, naming the member, as ``hg.hypergrad`` would.
"""

from __future__ import annotations

import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .._pytree import partition, signature
from ..errors import Failure, HyperDivergenceError
from ..hypergrad import ProgramCache, trained_objective, value_and_grad
from ..precision import matmul_precision
from . import checkpoint as ckpt
from . import fingerprint
from .progress import meter_for, tick

CHECKPOINT_FILE = "population"

_programs = ProgramCache(16)


def optimize_population(dyn, objective, lam, method, hyper_optimizer, hyper_steps, constraint, checkpoint_dir,
                        progress, axis: int, update_fn, result_type):
    """The population form of :func:`hypergradient.optimize` (which checks the arguments and calls it)."""
    lam = jax.tree.map(lambda x: jnp.moveaxis(x, axis, 0), lam)
    sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(lam)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"population_axis={axis}: every leaf of λ0 needs that axis, of one size K; got leading "
                         f"sizes {sorted(map(str, sizes))}")
    (k_members,) = sizes
    first = jax.tree.map(lambda x: x[0], lam)
    dyn.validate(first)
    method = method.resolve_members(dyn, [jax.tree.map(lambda x: x[i], lam) for i in range(k_members)], objective)
    method.check(dyn)
    arrays, skeleton = partition(objective)
    step, final = _programs_for(dyn, skeleton, arrays, method, first)
    update = jax.jit(jax.vmap(update_fn))
    opt_state = jax.vmap(hyper_optimizer.init)(lam)
    history = {"value": [], "grad_norm": [], "seconds": []}
    best = (jax.tree.map(lambda x: x[0], lam), np.inf, -1)
    start = 0

    path = None
    header = {"driver": "population", "members": k_members, "train_steps": dyn.steps,
              "weights": ckpt.spec(jax.eval_shape(dyn.initial_state, first)),
              "hparams0": fingerprint.digest(lam), "hyper_optimizer": fingerprint.digest(hyper_optimizer),
              "constraint": fingerprint.digest(constraint)}
    if checkpoint_dir is not None:
        path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_FILE)
        saved = ckpt.load(path)
        if saved is not None:
            ckpt.check_header(saved, header)
            lam = jax.tree.map(jnp.asarray, saved.restore("hparams", lam))
            opt_state = jax.tree.map(jnp.asarray, saved.restore("opt_state", opt_state))
            best = (jax.tree.map(jnp.asarray, saved.restore("best_hparams", best[0])), float(saved.header["best_value"]),
                    int(saved.header["best_step"]))
            start = int(saved.header["step"])
            stored = saved.restore_dict("history")
            history = {k: list(stored.get(k, np.zeros((0, k_members)))) for k in ("value", "grad_norm")}
            history["seconds"] = list(stored.get("seconds", np.zeros(0)))

    meter = meter_for(progress)
    run = meter.open(hyper_steps, min(start, hyper_steps))

    def write(step):
        ckpt.save(path, {"hparams": lam, "opt_state": opt_state, "best_hparams": best[0],
                         "history": {key: np.asarray(v) for key, v in history.items()}},
                  {**header, "step": step, "best_value": best[1], "best_step": best[2]})

    try:
        with ckpt.Periodic(path, write, start) as saving:
            for k in range(start, hyper_steps):
                t0 = time.perf_counter()
                sol = step(dyn, arrays, lam)
                _raise_failures(method, sol, k)
                ok = ~np.asarray(sol.diverged)
                if not ok.any():
                    raise HyperDivergenceError(
                        f"population: every one of the {k_members} members diverged at hyper-step {k}; error.hparams "
                        "holds their λ before it", k, None, jax.tree.map(np.asarray, lam), _history(history), best)
                values = np.where(ok, np.asarray(sol.value, np.float64), np.inf)
                i = int(np.argmin(values))
                if values[i] < best[1]:
                    best = (jax.tree.map(lambda x: np.asarray(x[i]), lam), float(values[i]), k)
                new_lam, new_opt = update(sol.grad, opt_state, lam)
                lam, opt_state = _where_members(ok, new_lam, lam), _where_members(ok, new_opt, opt_state)
                history["value"].append(values)
                history["grad_norm"].append(np.sqrt(sum(np.sum(np.square(np.asarray(g)).reshape(k_members, -1), axis=1)
                                                        for g in jax.tree.leaves(sol.grad))))
                history["seconds"].append(time.perf_counter() - t0)
                tick(run, float(values[i]))
                saving.done(k + 1, last=k + 1 == hyper_steps)
    finally:
        meter.close(run)

    params, values, losses = final(dyn, arrays, lam)
    values = np.where(np.isfinite(np.asarray(losses)).all(axis=1), np.asarray(values, np.float64), np.inf)
    i = int(np.argmin(values))
    member = jax.tree.map(lambda x: x[i], lam)
    if values[i] < best[1] or best[2] < 0:
        best = (member, float(values[i]), len(history["value"]))
    return result_type(member, dyn.model(jax.tree.map(lambda x: x[i], params)), float(values[i]),
                       _history(history), len(history["value"]), False, best[0], best[1], best[2], values)


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
        def per_member(fn):
            return jax.jit(lambda d, a, lam: jax.vmap(lambda l: fn(d, skeleton.combine(a), l))(lam))

        return (per_member(lambda d, o, l: value_and_grad(d, o, l, method)), per_member(trained_objective))

    key = (signature(dyn), skeleton, signature(arrays), method, signature(first), matmul_precision())
    return _programs.get_or_build(key, build)


def _history(history: dict) -> dict:
    return {k: np.asarray(v, np.float64) for k, v in history.items()}


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
