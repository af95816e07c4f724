"""hg.smoothness: the exact hypergradient against the objective's slopes at several scales.

The case it must flag: a relu network on digits in float64, whose exact ∂E/∂log lr is the
derivative of the smooth piece λ sits on, while the slope over a hyper-step's scale crosses jumps
and has the other sign. The same network with SiLU passes, and its slopes at small scales equal the
exact derivative (a finite-difference check of the hypergradient and of the batched runs).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import ridge_closed_form, ridge_problem
from sklearn.datasets import load_digits

import hypergradient as hg


@functools.cache
def digits_mlp(activation: str):
    """A 64-32-10 MLP trained by Adam for 100 steps of 32 digits, λ = log lr (float64)."""
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16.0), jnp.asarray(y)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    act = getattr(jax.nn, activation)
    w0 = [{"W": jax.random.normal(k1, (64, 32)) / 8, "b": jnp.zeros(32)},
          {"W": jax.random.normal(k2, (32, 10)) / math.sqrt(32), "b": jnp.zeros(10)}]

    def apply(w, x):
        return act(x @ w[0]["W"] + w[0]["b"]) @ w[1]["W"] + w[1]["b"]

    def ce(w, x, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(apply(w, x)), y[:, None], 1))

    dyn = hg.Dynamics(init=w0, loss=lambda w, lam, batch: ce(w, *batch), optimizer=hg.optim.adam(),
                      optimizer_hparams=lambda lam, t: {"lr": jnp.exp(lam["log_lr"])},
                      data=hg.Batches((x[:500], y[:500]), 32, key=k3), steps=100)
    objective = jax.tree_util.Partial(lambda xv, yv, w, lam: ce(w, xv, yv), x[500:800], y[500:800])
    return dyn, objective, {"log_lr": jnp.log(jnp.asarray(0.01))}


@pytest.mark.slow
def test_a_relu_network_is_flagged():
    dyn, objective, lam = digits_mlp("relu")
    check = hg.smoothness(dyn, objective, lam, random_directions=0)
    assert not check.ok
    assert check.reason.startswith("along -g the exact derivative")
    assert check.directions == ("-g",)
    ratio = check.slopes[0, check.judged] / check.exact[0]
    # the exact derivative along -g is -‖g‖ < 0; at the scales a hyper-step moves, the objective's slopes
    # disagree with it, in sign or by more than the factor of 3 the check allows
    assert check.exact[0] < 0 and np.any((ratio < 1 / 3) | (ratio > 3))
    assert "not ok" in str(check)


def test_the_same_network_with_silu_passes():
    dyn, objective, lam = digits_mlp("silu")
    check = hg.smoothness(dyn, objective, lam, random_directions=0)
    assert check.ok, str(check)
    assert check.reason == ""
    g = float(check.grad["log_lr"])
    assert check.exact[0] == pytest.approx(-abs(g), rel=1e-12)
    np.testing.assert_allclose(check.slopes[0, :3], check.exact[0], rtol=1e-4)
    # a central difference of a smooth f is off by O(h²): a tenth of the step, a hundredth of the error
    d = check.disagreement[0]
    np.testing.assert_allclose(d[1:3] / d[:2], 100, rtol=0.1)
    assert check.backward_growth is not None and 1 <= check.backward_growth < 1e3
    assert "ok: the exact hypergradient" in str(check)


def test_slopes_are_central_differences_of_plain_runs():
    """On ridge regression: gᵀd from the closed form, and every slope equals the central difference
    computed from two ordinary training runs."""
    dyn, objective, lam = ridge_problem()
    check = hg.smoothness(dyn, objective, lam, scales=(1e-4, 1e-2), random_directions=1,
                          key=jax.random.PRNGKey(3))
    _, closed = ridge_closed_form(lam, dyn.steps)
    g = np.array([closed["log_l2"], closed["lr"]])
    assert check.exact[0] == pytest.approx(-np.linalg.norm(g), rel=1e-8)
    assert check.ok and check.directions == ("-g", "random 1")
    lam_norm = math.hypot(float(lam["log_l2"]), float(lam["lr"]))
    assert check.steps == pytest.approx((1e-4 * lam_norm, 1e-2 * lam_norm))
    d = -g / np.linalg.norm(g)
    h = check.steps[1]

    def f(v):
        point = {"log_l2": lam["log_l2"] + v[0], "lr": lam["lr"] + v[1]}
        return float(objective(dyn.run(point), point))

    assert check.slopes[0, 1] == pytest.approx((f(h * d) - f(-h * d)) / (2 * h), rel=1e-10)
    again = hg.smoothness(dyn, objective, lam, scales=(1e-4, 1e-2), random_directions=1, key=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(again.slopes, check.slopes)


def test_thresholds_are_arguments():
    dyn, objective, lam = ridge_problem()
    strict = hg.smoothness(dyn, objective, lam, random_directions=0, growth_limit=0.5)
    assert not strict.ok and strict.reason.startswith("the backward pass grew")
    # at a tenth of ‖λ‖ the learning rate's step crosses into curvature the derivative cannot see
    wide = hg.smoothness(dyn, objective, lam, random_directions=0, step_range=(1e-1, 1e-1), factor=1.01, floor=0)
    assert not wide.ok and "scale 1e-01" in wide.reason
    with pytest.raises(ValueError, match="scales must be positive"):
        hg.smoothness(dyn, objective, lam, scales=(0.0,))
    with pytest.raises(ValueError, match="holds none of the scales"):
        hg.smoothness(dyn, objective, lam, scales=(1e-5,))


@functools.cache
def chaotic():
    """Gradient descent on a periodic loss with a large step (as in test_hypergrad): bounded forward,
    exploding backward."""
    dyn = hg.Dynamics(init=jnp.asarray([0.3, 1.1]), loss=lambda w, lam, b: -jnp.sum(jnp.cos(w)),
                      optimizer=hg.optim.sgd(), optimizer_hparams=lambda lam, t: {"lr": lam["lr"]}, steps=200)
    return dyn, lambda w, lam: jnp.sum(jnp.sin(w)), {"lr": jnp.asarray(5.0)}


def test_a_chaotic_run_is_flagged_and_the_warning_points_to_the_check():
    dyn, objective, lam = chaotic()
    with pytest.warns(hg.ChaosWarning, match=r"hg\.smoothness.*hg\.ES, hg\.PES"):
        hg.hypergrad(dyn, objective, lam)
    check = hg.smoothness(dyn, objective, lam, random_directions=0)
    assert not check.ok
    assert check.backward_growth > 1e8 and "chaotic" in check.reason


@pytest.mark.slow
def test_plan_reports_the_check():
    dyn, objective, lam = chaotic()
    text = str(hg.plan(dyn, objective, lam, check_smoothness=True))
    assert "hg.smoothness: not ok: the backward pass grew" in text
    assert "chaotic" in text and "(hg.ES, hg.PES)" in text
    dyn, objective, lam = ridge_problem()
    p = hg.plan(dyn, objective, lam, check_smoothness=True)
    assert p.smoothness.ok and "hg.smoothness: ok" in str(p)
    assert hg.plan(dyn, objective, lam).smoothness is None


def test_the_gradient_norm_survives_float32_overflow_of_its_square():
    from hypergradient.smoothness import _norm

    g = [jnp.full((3,), 1e24, jnp.float32), jnp.asarray([-2e24], jnp.float32)]
    assert math.isclose(_norm(g), math.sqrt(7) * 1e24, rel_tol=1e-6)
    assert _norm([jnp.zeros(2, jnp.float32)]) == 0.0
    assert _norm([jnp.asarray([jnp.inf], jnp.float32)]) == math.inf
