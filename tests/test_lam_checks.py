"""λ must fit the run: a per-step schedule of the wrong length, or a leaf nothing reads, is named
before anything is compiled (JAX would clamp the index, or give a zero hypergradient, silently)."""

import jax.numpy as jnp
import optax
import pytest

import hypergradient as hg
from problems import ridge_problem

T = 10


def schedule_problem():
    dyn, objective, lam = ridge_problem(steps=T)
    dyn = dyn.replace(optimizer_hparams=lambda lam, t: {"lr": lam["lr"][t]})
    return dyn, objective, {"lr": jnp.full(T, 0.05), "log_l2": lam["log_l2"]}


@pytest.mark.parametrize("length", [T - 5, T - 1])
def test_a_schedule_too_short_is_named(length):
    dyn, objective, lam = schedule_problem()
    lam["lr"] = jnp.full(length, 0.05)
    with pytest.raises(ValueError, match=rf"λ\['lr'\] \(size {length}\) at step t = {T - 1}.*needs {T} entries"):
        hg.hypergrad(dyn, objective, lam)


def test_a_schedule_too_long_is_named():
    dyn, objective, lam = schedule_problem()
    lam["lr"] = jnp.full(T + 5, 0.05)
    with pytest.raises(ValueError, match=rf"λ\['lr'\] has {T + 5} entries.*read only the first {T}"):
        hg.hypergrad(dyn, objective, lam)
    with pytest.raises(ValueError, match="read only the first"):
        hg.online(dyn, objective, lam, every=5, hyper_optimizer=optax.sgd(0.0), progress=False)


def test_a_leaf_nothing_reads_is_named():
    dyn, objective, lam = schedule_problem()
    lam["extra"] = jnp.asarray(1.0)
    with pytest.warns(hg.UnusedHyperparameterWarning, match=r"λ\['extra'\] is read by nothing"):
        hg.hypergrad(dyn, objective, lam)
    with pytest.warns(hg.UnusedHyperparameterWarning, match=r"λ\['extra'\] is read by nothing"):
        hg.optimize(dyn, objective, {k: jnp.stack([v, v]) for k, v in lam.items()}, hyper_steps=1,
                    population_axis=0, progress=False)


def test_schedules_that_fit_pass():
    """Exactly T entries; a piecewise schedule of T/5 entries read as t // 5; a per-layer value."""
    dyn, objective, lam = schedule_problem()
    assert hg.hypergrad(dyn, objective, lam).grad["lr"].shape == (T,)
    piecewise = dyn.replace(optimizer_hparams=lambda lam, t: {"lr": lam["lr"][t // 5]})
    assert hg.hypergrad(piecewise, objective, {**lam, "lr": jnp.full(T // 5, 0.05)}).grad["lr"].shape == (T // 5,)
