"""Does λ fit the run? Checks made once per problem, before compiling.

JAX clamps an index that runs past an array's end, so a per-step schedule one entry short reuses
its last value at the last step, and one too long leaves its tail with a zero hypergradient; a
leaf of λ that nothing reads gets a zero hypergradient too. None of these raises on its own.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.extend.core import Literal

from ._pytree import is_inexact
from .errors import UnusedHyperparameterWarning
from .precision import library_precision


def check_fits(dyn, energy, lam) -> None:
    """Raise ``ValueError`` naming a per-step leaf of λ whose length does not match the run's ``T``
    steps; warn (:class:`~hypergradient.UnusedHyperparameterWarning`) naming a leaf that no part
    of the run reads.

    ``energy(s, λ)`` is the objective at a training state (as methods call it).
    """
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(lam)[0])
    names = [jax.tree_util.keystr(p) or "λ" for p in paths]
    with library_precision():  # the loss is traced as the run traces it
        read_by = {part: _reads(fn, lam) for part, fn in _parts(dyn, energy).items()}
    for i, name in enumerate(names):
        if not any(reads[i] for reads in read_by.values()):
            warnings.warn(UnusedHyperparameterWarning(
                f"hyperparameter λ{name} is read by nothing (not by init, optimizer_hparams, the loss or the "
                "objective), so its hypergradient is zero: remove it from λ, or use it"), stacklevel=4)
    _check_last_step(dyn, lam, names, leaves)
    schedules = [i for i, x in enumerate(leaves) if read_by["optimizer_hparams"][i] and np.ndim(x) >= 1
                 and np.shape(x)[0] > dyn.steps and not any(read_by[p][i] for p in read_by if p != "optimizer_hparams")]
    if schedules:
        _check_tails(dyn, lam, names, leaves, schedules)


def _parts(dyn, energy) -> dict:
    from .dynamics import model_state

    t = jnp.zeros((), jnp.int32)

    def loss(lam):
        s = dyn.initial_state(lam)
        return dyn.train_loss(s.params, lam, dyn.batch(t), model_state(s), dyn.step_key(t))[0]

    return {
        "init": dyn.initial_state,
        "optimizer_hparams": lambda lam: dyn.hparams(lam, jnp.asarray(dyn.steps - 1, jnp.int32)),
        "loss": loss,
        "objective": lambda lam: energy(dyn.initial_state(lam), lam),
    }


def _reads(fn, lam) -> list[bool]:
    """For each leaf of λ, whether ``fn(λ)`` reads it (an operation that takes it counts, inner
    programs are not opened: this errs towards yes)."""
    jaxpr = jax.make_jaxpr(fn)(lam).jaxpr
    used = set()
    for eqn in jaxpr.eqns:
        used.update(v for v in eqn.invars if not isinstance(v, Literal))
    used.update(v for v in jaxpr.outvars if not isinstance(v, Literal))
    return [v in used for v in jaxpr.invars]


_OUT_OF_BOUNDS = re.compile(r"index (-?\d+) is out of bounds for axis (\d+) with size (\d+)")


def _check_last_step(dyn, lam, names, leaves) -> None:
    """A leaf indexed past its end at the last step, t = T − 1 (a per-step schedule too short)."""
    last = jnp.asarray(dyn.steps - 1, jnp.int32)
    checked = checkify.checkify(lambda lam, t: dyn.hparams(lam, t), errors=checkify.index_checks)
    err, _ = jax.jit(checked)(lam, last)
    message = err.get()
    if message is None:
        return
    found = _OUT_OF_BOUNDS.search(message)
    if found is None:
        raise ValueError(f"optimizer_hparams at the last step, t = {dyn.steps - 1}: {message.splitlines()[0]}")
    index, axis, size = map(int, found.groups())
    suspects = [n for n, x in zip(names, leaves) if np.ndim(x) > axis and np.shape(x)[axis] == size]
    which = " or ".join(f"λ{n}" for n in suspects) or "a leaf of λ"
    raise ValueError(
        f"optimizer_hparams reads index {index} of {which} (size {size}) at step t = {dyn.steps - 1}: a per-step "
        f"schedule over this run's T = {dyn.steps} steps needs {dyn.steps} entries (JAX would reuse the last one)")


def _check_tails(dyn, lam, names, leaves, schedules) -> None:
    """A per-step leaf longer than the run: entries no step reads (their hypergradient is zero)."""

    def total(picked):
        full = [picked[schedules.index(i)] if i in schedules else x for i, x in enumerate(leaves)]
        lam_ = jax.tree.unflatten(jax.tree.structure(lam), full)

        @jax.checkpoint
        def one(t):
            return sum(jnp.sum(h) for h in jax.tree.leaves(dyn.hparams(lam_, t)) if is_inexact(h))

        return jax.lax.fori_loop(0, dyn.steps, lambda t, acc: acc + one(t), jnp.zeros(()))

    grads = jax.jit(jax.grad(total))([leaves[i] for i in schedules])
    for i, g in zip(schedules, grads):
        touched = np.flatnonzero(np.any(np.asarray(g).reshape(g.shape[0], -1) != 0, axis=1))
        read = int(touched[-1]) + 1 if touched.size else 0
        if read < g.shape[0]:
            raise ValueError(
                f"λ{names[i]} has {g.shape[0]} entries along its first axis, but the run's T = {dyn.steps} steps read "
                f"only the first {read}: its last {g.shape[0] - read} would get a zero hypergradient; give it "
                f"{read} entries")
