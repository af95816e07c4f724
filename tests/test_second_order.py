"""Reverse(second_order="forward"): the Hessian products of each backward step as jvp of grad
(forward-over-reverse) give the hypergradient of plain autodiff (reverse-over-reverse) to
rounding, and central differences agree with both."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergradient as hg
import test_model_state as stateful
from problems import central_difference, random_direction, tree_dot

T, N, D, H, B = 8, 24, 4, 7, 6


def _problem(optimizer, hparams):
    """A tanh MLP; λ: a weight decay that enters the loss, a per-step learning-rate schedule that
    enters only the optimizer."""
    rng = np.random.default_rng(0)
    x, xv = jnp.asarray(rng.normal(size=(N, D))), jnp.asarray(rng.normal(size=(N, D)))
    y, yv = jnp.sin(x @ jnp.ones(D)), jnp.sin(xv @ jnp.ones(D))
    w0 = {"W": jnp.asarray(rng.normal(size=(D, H)) / 2), "v": jnp.asarray(rng.normal(size=H) / 3)}

    def predict(w, x):
        return jnp.tanh(x @ w["W"]) @ w["v"]

    def loss(w, lam, batch):
        bx, by = batch
        return jnp.mean((predict(w, bx) - by) ** 2) + jnp.exp(lam["log_wd"]) * jnp.sum(w["W"] ** 2)

    def objective(w, lam):
        return jnp.mean((predict(w, xv) - yv) ** 2)

    dyn = hg.Dynamics(init=w0, loss=loss, optimizer=optimizer,
                      optimizer_hparams=hparams,
                      data=hg.Batches((x, y), B, key=jax.random.key(1)), steps=T)
    lam = {"log_wd": jnp.asarray(-3.0), "log_lr": jnp.log(0.1) + 0.1 * jnp.asarray(rng.normal(size=T))}
    return dyn, objective, lam


OPTIMIZERS = {
    "momentum": (hg.optim.momentum(), lambda lam, t: {"lr": jnp.exp(lam["log_lr"][t]), "momentum": 0.7}),
    "adam": (hg.optim.from_optax(optax.adam, learning_rate=0.05),
             lambda lam, t: {"learning_rate": 0.5 * jnp.exp(lam["log_lr"][t])}),
}
PROBLEMS = {name: _problem(*opt) for name, opt in OPTIMIZERS.items()}


@functools.cache
def _grad(name, method):
    dyn, objective, lam = PROBLEMS[name]
    return jax.jit(lambda lam: hg.value_and_grad(dyn, objective, lam, method))(lam)


def assert_close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("name, every", [("momentum", None), ("momentum", 3), ("adam", None)])
def test_forward_over_reverse_equals_reverse_over_reverse(name, every):
    fwd = _grad(name, hg.Reverse(checkpoint_every=every, second_order="forward"))
    rev = _grad(name, hg.Reverse(checkpoint_every=every))
    np.testing.assert_allclose(float(fwd.value), float(rev.value), rtol=1e-13)
    assert_close(fwd.grad, rev.grad, 1e-10)
    assert all(float(jnp.max(jnp.abs(g))) > 1e-6 for g in jax.tree.leaves(fwd.grad))  # both λ reach f
    if every is None:  # central differences, along a random direction
        dyn, objective, lam = PROBLEMS[name]
        v = random_direction(lam)
        fd = central_difference(jax.jit(lambda lam: objective(dyn.run(lam), lam)), lam, v)
        assert abs(tree_dot(fwd.grad, v) - fd) <= 1e-6 * max(1.0, abs(fd))


def test_under_vmap_and_jit():
    dyn, objective, lam = PROBLEMS["momentum"]
    lams = jax.tree.map(lambda x: jnp.stack([x, x + 0.1]), lam)

    def grads(method):
        return jax.jit(jax.vmap(lambda lam: hg.value_and_grad(dyn, objective, lam, method).grad))(lams)

    fwd, rev = grads(hg.Reverse(second_order="forward")), grads(hg.Reverse())
    assert_close(fwd, rev, 1e-10)
    assert float(jnp.max(jnp.abs(fwd["log_wd"][0] - fwd["log_wd"][1]))) > 1e-8  # two members, two answers


def test_with_the_adjoint_in_its_own_dtype():
    fwd = _grad("momentum", hg.Reverse(3, adjoint_dtype=jnp.float64, second_order="forward"))
    assert_close(fwd.grad, _grad("momentum", hg.Reverse()).grad, 1e-10)


def test_a_run_with_model_state_and_keys():
    """BatchNorm-like running statistics (whose cotangents are first order, an integer counter
    among them) and dropout keys, through nested checkpointing."""
    res = hg.hypergrad(stateful.dynamics(), stateful.objective, stateful.LAM,
                       hg.Reverse(checkpoint_every=(6, 2), second_order="forward"))
    stateful.assert_close(res.grad, stateful.REF_GRAD, 1e-10)
    assert int(res.state["count"]) == stateful.T


def test_auto_chooses_one():
    """From XLA's figures for both programs; the choice is one of the two, the same hypergradient."""
    dyn, objective, lam = PROBLEMS["momentum"]
    mode = hg.Reverse(second_order="auto").resolve(dyn, lam, objective).second_order
    assert mode in ("forward", "reverse")
    assert_close(_grad("momentum", hg.Reverse(second_order=mode)).grad, _grad("momentum", hg.Reverse()).grad, 1e-10)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="second_order must be one of"):
        hg.Reverse(second_order="mixed")
