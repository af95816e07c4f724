"""hg.chunked: the same objective and hypergradient as the plain mean, with the memory of one chunk
in its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergradient as hg
from hypergradient import planning
from problems import mlp_problem


def validation_problem(nv=1000, width=64, steps=6):
    """A wide tanh layer trained on 32 examples, validated on ``nv``: the objective's activations
    (nv × width) dwarf the run's, so its gradient sets the memory floor."""
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(32, 8))), jnp.asarray(rng.normal(size=32))
    xv, yv = jnp.asarray(rng.normal(size=(nv, 8))), jnp.asarray(rng.normal(size=nv))
    w0 = {"W": jnp.asarray(rng.normal(size=(8, width)) / 3), "v": jnp.asarray(rng.normal(size=width) / 8)}

    def mean_loss(w, lam, batch):
        bx, by = batch
        h = jnp.tanh(jnp.tanh(bx @ w["W"]) @ (w["W"].T @ w["W"]) * jnp.exp(lam["log_scale"]))
        return jnp.mean((h @ w["v"] - by) ** 2)

    def loss(w, lam, batch):
        return mean_loss(w, lam, batch) + jnp.exp(lam["log_l2"]) * jnp.sum(w["W"] ** 2)

    dyn = hg.Dynamics(w0, loss, hg.optim.sgd(), lambda lam, t: {"lr": lam["lr"]}, (x, y), steps)
    lam = {"lr": jnp.asarray(0.05), "log_l2": jnp.asarray(-3.0), "log_scale": jnp.asarray(0.0)}
    plain = jax.tree_util.Partial(lambda xv, yv, w, lam: mean_loss(w, lam, (xv, yv)), xv, yv)
    return dyn, plain, mean_loss, (xv, yv), lam


@pytest.mark.parametrize("chunk_size", [100, 128, 1000, 5000])  # exact chunks, a short last one, one, too big
def test_chunked_equals_the_plain_objective(chunk_size):
    dyn, plain, mean_loss, data, lam = validation_problem()
    chunked = hg.chunked(mean_loss, data, chunk_size)
    reference = hg.hypergrad(dyn, plain, lam)
    res = hg.hypergrad(dyn, chunked, lam)
    np.testing.assert_allclose(float(res.value), float(reference.value), rtol=1e-12)
    for a, b in zip(jax.tree.leaves(res.grad), jax.tree.leaves(reference.grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


def test_chunked_lowers_the_memory_of_the_hypergradient():
    dyn, plain, mean_loss, data, lam = validation_problem()
    chunked = hg.chunked(mean_loss, data, 100)
    whole = hg.hypergrad(dyn, plain, lam).stats["temp_bytes"]
    parts = hg.hypergrad(dyn, chunked, lam).stats["temp_bytes"]
    assert parts < whole / 2, (parts, whole)
    objective_plain = planning.temp_bytes(planning.objective_program(dyn, plain, lam))
    objective_chunked = planning.temp_bytes(planning.objective_program(dyn, chunked, lam))
    assert objective_chunked < objective_plain / 5, (objective_chunked, objective_plain)


def test_chunked_is_a_pytree_of_its_data():
    _, _, mean_loss, data, _ = validation_problem(nv=10)
    objective = hg.chunked(mean_loss, data, 4)
    assert len(jax.tree.leaves(objective)) == 2  # the arrays are program arguments, never constants
    with pytest.raises(ValueError, match="chunk_size"):
        hg.chunked(mean_loss, data, 0)
    with pytest.raises(ValueError, match="same number of examples"):
        hg.chunked(mean_loss, (jnp.zeros(3), jnp.zeros(4)), 2)


def test_auto_names_the_objective_when_it_sets_the_floor():
    dyn, plain, _, _, lam = validation_problem()
    whole = hg.hypergrad(dyn, plain, lam).stats["temp_bytes"]
    objective = planning.temp_bytes(planning.objective_program(dyn, plain, lam))
    assert objective > whole / 2
    with pytest.raises(hg.MethodError, match=r"the objective's gradient alone .*hg\.chunked"):
        hg.hypergrad(dyn, plain, lam, hg.Auto(memory_budget=objective // 2))


@pytest.mark.slow
def test_auto_names_the_run_when_the_trajectory_sets_the_floor():
    dyn, objective, lam = mlp_problem(steps=37, optimizer=hg.optim.nesterov())
    with pytest.raises(hg.MethodError, match="shorten the run") as info:
        hg.hypergrad(dyn, objective, lam, hg.Auto(memory_budget=4096))
    assert "chunked" not in str(info.value)
