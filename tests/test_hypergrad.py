"""One suite over every exact hypergradient method: finite differences, closed forms, agreement."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergradient as hg
from problems import (
    central_difference,
    mlp_problem,
    outer_value,
    random_direction,
    ridge_closed_form,
    ridge_problem,
    tree_dot,
)

T = 12


def exact_methods(steps):
    """Every method that must give the exact hypergradient of a ``steps``-step run."""
    return [hg.Reverse(), hg.Reverse(checkpoint_every=5), hg.Forward(), hg.Truncated(steps)]


EXACT = exact_methods(T)


def assert_tree_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(y)) + 1e-30))


@pytest.mark.parametrize("method", exact_methods(25), ids=repr)
def test_ridge_matches_closed_form(method):
    dyn, objective, lam = ridge_problem(steps=25)
    res = hg.hypergrad(dyn, objective, lam, method)
    value, grad = ridge_closed_form(lam, steps=25)
    np.testing.assert_allclose(float(res.value), value, rtol=1e-10)
    np.testing.assert_allclose(float(res.grad["log_l2"]), grad["log_l2"], rtol=1e-8)
    np.testing.assert_allclose(float(res.grad["lr"]), grad["lr"], rtol=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("method", EXACT, ids=repr)
def test_mlp_every_kind_of_hyperparameter_matches_finite_differences(method):
    dyn, objective, lam = mlp_problem(steps=T)
    res = hg.hypergrad(dyn, objective, lam, method)
    f = outer_value(dyn, objective)
    np.testing.assert_allclose(float(res.value), float(f(lam)), rtol=1e-12)
    for group in lam:  # each kind separately, so one wrong group cannot hide behind another
        direction = jax.tree.map(jnp.zeros_like, lam)
        direction[group] = random_direction(lam[group], seed=len(group))
        fd = central_difference(f, lam, direction)
        np.testing.assert_allclose(tree_dot(res.grad, direction), fd, rtol=2e-6, atol=1e-9, err_msg=group)


def test_methods_agree():
    dyn, objective, lam = mlp_problem(steps=T)
    reference = hg.hypergrad(dyn, objective, lam, hg.Reverse()).grad
    for method in EXACT[1:]:
        assert_tree_close(hg.hypergrad(dyn, objective, lam, method).grad, reference, rtol=1e-8)


@pytest.mark.slow
def test_checkpointing_with_a_remainder_segment():
    dyn, objective, lam = mlp_problem(steps=T)
    reference = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    for k in (1, 5, 7, T, 50):
        res = hg.hypergrad(dyn, objective, lam, hg.Reverse(checkpoint_every=k))
        assert_tree_close(res.grad, reference.grad, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(res.params[0]["W"]), np.asarray(reference.params[0]["W"]), rtol=1e-13)


def test_truncated_drops_the_early_steps():
    dyn, objective, lam = mlp_problem(steps=T)
    res = hg.hypergrad(dyn, objective, lam, hg.Truncated(3))
    # learning rates before the last 3 steps, and the init scale, get no gradient
    assert np.all(np.asarray(res.grad["lr"][: T - 3]) == 0)
    assert np.all(np.asarray(res.grad["log_scale"]) == 0)
    assert np.any(np.asarray(res.grad["lr"][T - 3 :]) != 0)
    # and what it does give is the exact gradient through the last 3 steps
    full = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    np.testing.assert_allclose(float(res.value), float(full.value), rtol=1e-12)
    assert res.stats["truncation"] == 3


OPTIMIZERS = {
    "sgd": (hg.optim.sgd(), lambda lam, t: {"lr": list(lam["lr"][t])}),
    "momentum": (hg.optim.momentum(), lambda lam, t: {"lr": list(lam["lr"][t]), "momentum": list(lam["mu"][t])}),
    "dampened": (
        hg.optim.momentum(dampen=True),
        lambda lam, t: {"lr": list(lam["lr"][t]), "momentum": list(lam["mu"][t])},
    ),
    "nesterov": (hg.optim.nesterov(), lambda lam, t: {"lr": list(lam["lr"][t]), "momentum": list(lam["mu"][t])}),
    "adam": (hg.optim.adam(), lambda lam, t: {"lr": list(0.02 * lam["lr"][t]), "b1": lam["mu"][t, 0], "b2": 0.99}),
    "rmsprop": (hg.optim.rmsprop(), lambda lam, t: {"lr": list(0.02 * lam["lr"][t]), "decay": lam["mu"][t, 0]}),
    "optax.adam": (
        hg.optim.from_optax(optax.adam, learning_rate=0.01, b1=0.9),
        lambda lam, t: {"learning_rate": 0.02 * lam["lr"][t, 0], "b1": lam["mu"][t, 0]},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_matches_finite_differences(name):
    optimizer, hparams = OPTIMIZERS[name]

    def schedule(lam, t):
        return hparams({"lr": lam["lr"], "mu": lam["momentum"]}, t)

    dyn, objective, lam = mlp_problem(steps=8, optimizer=optimizer, hparams=schedule)
    reverse = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    forward = hg.hypergrad(dyn, objective, lam, hg.Forward())
    assert_tree_close(forward.grad, reverse.grad, rtol=1e-8)
    f = outer_value(dyn, objective)
    direction = random_direction(lam, seed=1)
    np.testing.assert_allclose(tree_dot(reverse.grad, direction), central_difference(f, lam, direction), rtol=2e-6)


@pytest.mark.slow
def test_per_weight_learning_rates():
    """A hyperparameter with the weights' full structure: one learning rate per weight."""

    def schedule(lam, t):
        return {"lr": lam["lr_per_weight"], "momentum": 0.5}

    dyn, objective, lam = mlp_problem(steps=6, hparams=schedule)
    w0 = dyn.initial_params(lam)
    lam = {**lam, "lr_per_weight": jax.tree.map(lambda w: jnp.full_like(w, 0.2), w0)}
    res = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    assert jax.tree.structure(res.grad["lr_per_weight"]) == jax.tree.structure(w0)
    f = outer_value(dyn, objective)
    direction = jax.tree.map(jnp.zeros_like, lam)
    direction["lr_per_weight"] = random_direction(lam["lr_per_weight"], seed=3)
    np.testing.assert_allclose(tree_dot(res.grad, direction), central_difference(f, lam, direction), rtol=2e-6)
    assert_tree_close(hg.hypergrad(dyn, objective, lam, hg.Forward()).grad, res.grad, rtol=1e-8)


def test_compiled_once_per_problem():
    traces = []
    dyn, objective, lam = mlp_problem(steps=5)
    inner = dyn.loss

    def counting_loss(w, lam, batch):
        traces.append(1)
        return inner(w, lam, batch)

    dyn = hg.Dynamics(dyn.init, counting_loss, dyn.optimizer, dyn.optimizer_hparams, dyn.data, dyn.steps)
    first = hg.hypergrad(dyn, objective, lam)
    n = len(traces)
    assert first.stats["compile_seconds"] > 0
    for scale in (0.9, 1.1):
        res = hg.hypergrad(dyn, objective, jax.tree.map(lambda x: scale * x, lam))
        assert res.stats["compile_seconds"] == 0
    assert len(traces) == n, "hypergrad re-traced the training loss on a repeated call"


def test_stats_report_time_and_memory():
    dyn, objective, lam = mlp_problem(steps=T)
    full = hg.hypergrad(dyn, objective, lam, hg.Reverse()).stats
    ckpt = hg.hypergrad(dyn, objective, lam, hg.Reverse(checkpoint_every=3)).stats
    assert full["steps"] == T and full["seconds"] > 0
    assert full["hparam_numbers"] == sum(x.size for x in jax.tree.leaves(lam))
    assert 0 < ckpt["temp_bytes"] < full["temp_bytes"]


@pytest.mark.slow
def test_an_optax_schedule_is_evaluated_at_every_step():
    schedule = optax.exponential_decay(0.3, transition_steps=4, decay_rate=0.5)
    scheduled = hg.optim.from_optax(optax.sgd, learning_rate=schedule, momentum=0.5)
    dyn, objective, lam = mlp_problem(
        steps=8, optimizer=scheduled, hparams=lambda lam, t: {"momentum": lam["momentum"][t, 0]})
    by_hand, _, _ = mlp_problem(
        steps=8, optimizer=hg.optim.momentum(),
        hparams=lambda lam, t: {"lr": 0.3 * 0.5 ** (t / 4), "momentum": lam["momentum"][t, 0]})
    # optax evaluates the schedule in float32: agreement to its precision (a wrong step is off by %s)
    assert_tree_close(dyn.run(lam), by_hand.run(lam), rtol=1e-6)
    res = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    assert_tree_close(res.grad, hg.hypergrad(by_hand, objective, lam, hg.Reverse()).grad, rtol=1e-5)
    clash, _, _ = mlp_problem(steps=4, optimizer=scheduled, hparams=lambda lam, t: {"learning_rate": 0.1})
    with pytest.raises(ValueError, match=r"\['learning_rate'\] is a schedule"):
        hg.hypergrad(clash, objective, lam)


def test_a_chaotic_run_is_reported():
    """Gradient descent on a periodic loss with a large step is chaotic (bounded forward, exploding
    backward): the growth of the backward pass is measured and a warning says what it means."""
    dyn = hg.Dynamics(init=jnp.asarray([0.3, 1.1]), loss=lambda w, lam, b: -jnp.sum(jnp.cos(w)),
                      optimizer=hg.optim.sgd(), optimizer_hparams=lambda lam, t: {"lr": lam["lr"]}, steps=200)
    objective = lambda w, lam: jnp.sum(jnp.sin(w))  # noqa: E731
    with pytest.warns(hg.ChaosWarning, match="chaotic"):
        res = hg.hypergrad(dyn, objective, {"lr": jnp.asarray(5.0)})
    assert res.stats["backward_growth"] > 1e8
    for method in (hg.Reverse(), hg.Reverse(checkpoint_every=4)):
        dyn2, objective2, lam = ridge_problem(steps=25)
        stable = hg.hypergrad(dyn2, objective2, lam, method)
        assert 1 <= stable.stats["backward_growth"] < 10


@pytest.mark.parametrize(
    "optimizer",
    [hg.optim.adam(), hg.optim.rmsprop(), hg.optim.from_optax(optax.adam, learning_rate=0.1),
     hg.optim.from_optax(optax.rmsprop, learning_rate=0.1),
     hg.optim.from_optax(optax.adamw, learning_rate=0.1, weight_decay=1e-2)],
    ids=lambda o: o.name,
)
@pytest.mark.slow
def test_adaptive_optimizers_are_finite_where_a_weight_never_sees_a_gradient(optimizer):
    """Logistic regression whose feature 0 is zero in every training example, from W = 0, with
    log L2 as the hyperparameter: W[0] never moves, whatever λ. Reverse and Forward agree."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 5))
    x[:, 0] = 0
    y = (rng.normal(size=100) > 0).astype(np.float32)
    xv, yv = rng.normal(size=(50, 5)), (rng.normal(size=50) > 0).astype(np.float32)

    def loss(w, lam, batch):
        bx, by = batch
        return jnp.mean(optax.sigmoid_binary_cross_entropy(bx @ w["W"] + w["b"], by)) + jnp.exp(lam["log_l2"]) * jnp.sum(w["W"] ** 2)

    def objective(w, lam):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(xv @ w["W"] + w["b"], yv))

    for dtype in (jnp.float32, jnp.float64):
        dyn = hg.Dynamics(init={"W": jnp.zeros(5, dtype), "b": jnp.zeros((), dtype)}, loss=loss, optimizer=optimizer,
                          optimizer_hparams=lambda lam, t: {optimizer.hparam_names[0]: 0.1},
                          data=(jnp.asarray(x, dtype), jnp.asarray(y, dtype)), steps=50)
        lam = {"log_l2": jnp.asarray(-3.0, dtype)}
        res = hg.hypergrad(dyn, objective, lam)  # raised DivergenceError (a NaN hypergradient) before
        assert np.isfinite(float(res.grad["log_l2"])) and float(res.params["W"][0]) == 0.0
        forward = hg.hypergrad(dyn, objective, lam, hg.Forward())
        np.testing.assert_allclose(float(forward.grad["log_l2"]), float(res.grad["log_l2"]),
                                   rtol=1e-4 if dtype == jnp.float32 else 1e-10)
    fd = central_difference(outer_value(dyn, objective), lam, {"log_l2": jnp.asarray(1.0)})
    np.testing.assert_allclose(float(res.grad["log_l2"]), fd, rtol=1e-6)
