"""Implicit differentiation: exact at a stationary point, against the ridge closed form and Reverse."""

import jax.numpy as jnp
import numpy as np
import pytest

import hypergradient as hg
from problems import ridge_closed_form, ridge_problem

STEPS = 400  # long enough for gradient descent to converge on the ridge problem


@pytest.mark.parametrize("method", [hg.Implicit("cg", iters=50), hg.Implicit("neumann", iters=400, alpha=0.2)], ids=repr)
def test_converged_ridge_matches_the_closed_form(method):
    dyn, objective, lam = ridge_problem(steps=STEPS)
    res = hg.hypergrad(dyn, objective, lam, method)
    value, grad = ridge_closed_form(lam, steps=STEPS)
    assert res.stats["grad_norm_at_wT"] < 1e-10
    np.testing.assert_allclose(float(res.value), value, rtol=1e-10)
    np.testing.assert_allclose(float(res.grad["log_l2"]), grad["log_l2"], rtol=1e-7)
    # the learning rate does not move the minimiser: its hypergradient vanishes at convergence
    assert abs(float(res.grad["lr"])) < 1e-12 and abs(grad["lr"]) < 1e-10
    reverse = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    np.testing.assert_allclose(float(res.grad["log_l2"]), float(reverse.grad["log_l2"]), rtol=1e-7)


def test_implicit_is_biased_before_convergence():
    dyn, objective, lam = ridge_problem(steps=3)
    implicit = hg.hypergrad(dyn, objective, lam, hg.Implicit())
    reverse = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    assert implicit.stats["grad_norm_at_wT"] > 1e-2
    assert abs(float(implicit.grad["log_l2"]) - float(reverse.grad["log_l2"])) > 1e-3


def test_implicit_refuses_data_it_cannot_sum_over():
    dyn, objective, lam = ridge_problem(steps=5)
    x, y = dyn.data

    def turning(t):  # every example at every step, in an order that turns with t
        return jnp.roll(x, t, axis=0), jnp.roll(y, t, axis=0)

    as_fn = hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer, dyn.optimizer_hparams, turning, 5)
    with pytest.raises(hg.MethodError, match="whole training set"):
        hg.hypergrad(as_fn, objective, lam, hg.Implicit())
    with pytest.raises(ValueError, match="solver"):
        hg.Implicit(solver="lu")


def test_off_stationarity_it_warns_and_strict_raises():
    dyn, objective, lam = ridge_problem(steps=3)
    with pytest.warns(hg.ImplicitWarning, match="not a stationary point"):
        res = hg.hypergrad(dyn, objective, lam, hg.Implicit())
    assert res.stats["stationarity"] > 1e-3
    with pytest.raises(hg.MethodError, match="not a stationary point"):
        hg.hypergrad(dyn, objective, lam, hg.Implicit(strict=True))


def test_an_unconverged_solve_warns():
    dyn, objective, lam = ridge_problem(steps=STEPS)
    with pytest.warns(hg.ImplicitWarning, match="solve .* stopped at relative residual"):
        res = hg.hypergrad(dyn, objective, lam, hg.Implicit("neumann", iters=2))
    assert res.stats["solve_residual"] > 1e-3 and res.stats["stationarity"] < 1e-8


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_the_defaults_converge_on_the_ridge_problem(solver):
    """No warning and the closed form, with every setting left at its default (Neumann's step from
    power iteration)."""
    import warnings

    dyn, objective, lam = ridge_problem(steps=STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = hg.hypergrad(dyn, objective, lam, hg.Implicit(solver))
    _, grad = ridge_closed_form(lam, steps=STEPS)
    np.testing.assert_allclose(float(res.grad["log_l2"]), grad["log_l2"], rtol=1e-6)
    assert res.stats["solve_residual"] < 1e-6
