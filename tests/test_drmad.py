"""DrMAD: exact on a straight-line trajectory, close to Reverse for regularisation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergradient as hg
from hypergradient.methods.drmad import UNSTABLE_GROWTH as DrMAD_UNSTABLE
from hypergradient.methods.drmad import DrMAD
from problems import mlp_problem

jax.config.update("jax_enable_x64", True)


def cosine(a, b):
    a, b = np.ravel(np.asarray(a)), np.ravel(np.asarray(b))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


OPTIMIZERS = [
    (hg.optim.sgd(), lambda lam, t: {"lr": list(lam["lr"][t])}),
    (hg.optim.momentum(), None),
    (hg.optim.momentum(dampen=True), None),
    (hg.optim.adam(), lambda lam, t: {"lr": list(0.05 * lam["lr"][t])}),
    (hg.optim.from_optax(optax.sgd, learning_rate=0.1, momentum=0.9), lambda lam, t: {"learning_rate": lam["lr"][t, 0]}),
]


@pytest.mark.parametrize("optimizer,hparams", OPTIMIZERS, ids=lambda o: getattr(o, "name", ""))
def test_one_step_is_exact(optimizer, hparams):
    # with T = 1 the straight line is the trajectory: DrMAD is Reverse
    dyn, objective, lam = mlp_problem(steps=1, optimizer=optimizer, hparams=hparams)
    reference = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    res = hg.hypergrad(dyn, objective, lam, DrMAD())
    np.testing.assert_allclose(float(res.value), float(reference.value), rtol=1e-12)
    for x, y in zip(jax.tree.leaves(res.grad), jax.tree.leaves(reference.grad)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-10, atol=1e-14)


def test_linear_loss_trajectory_is_a_straight_line_and_exact():
    # constant gradient and lr: w_t = w_0 − t·η·c is exactly the interpolation, for any T
    c = jnp.asarray([1.0, -2.0, 0.5])
    dyn = hg.Dynamics(
        init=lambda lam: lam["w0"],
        loss=lambda w, lam, batch: jnp.dot(c * jnp.exp(lam["log_c"]), w),
        optimizer=hg.optim.sgd(),
        optimizer_hparams=lambda lam, t: {"lr": lam["lr"]},
        steps=7,
    )
    objective = lambda w, lam: jnp.sum(jnp.sin(w) ** 2)  # noqa: E731
    lam = {"w0": jnp.asarray([0.1, 0.2, 0.3]), "lr": jnp.asarray(0.05), "log_c": jnp.asarray(0.2)}
    reference = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    res = hg.hypergrad(dyn, objective, lam, DrMAD())
    for k in lam:
        np.testing.assert_allclose(np.asarray(res.grad[k]), np.asarray(reference.grad[k]), rtol=1e-10)


def test_close_to_reverse_for_l2_on_a_convex_problem():
    # logistic regression with one L2 strength per feature, trained by heavy-ball momentum
    rng = np.random.default_rng(0)
    x, xv = rng.normal(size=(80, 6)), rng.normal(size=(60, 6))
    w_true = rng.normal(size=6)
    y = (x @ w_true + 0.5 * rng.normal(size=80) > 0).astype(float)
    yv = (xv @ w_true + 0.5 * rng.normal(size=60) > 0).astype(float)

    def nll(w, x, y):
        z = x @ w
        return jnp.mean(jnp.logaddexp(0, z) - y * z)

    dyn = hg.Dynamics(
        init=jnp.zeros(6),
        loss=lambda w, lam, b: nll(w, *b) + jnp.sum(jnp.exp(lam["log_l2"]) * w**2),
        optimizer=hg.optim.momentum(),
        optimizer_hparams=lambda lam, t: {"lr": 0.1, "momentum": 0.5},
        data=(jnp.asarray(x), jnp.asarray(y)),
        steps=60,
    )
    objective = lambda w, lam: nll(w, jnp.asarray(xv), jnp.asarray(yv))  # noqa: E731
    lam = {"log_l2": jnp.asarray(np.linspace(-4, -1, 6))}
    reference = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    res = hg.hypergrad(dyn, objective, lam, DrMAD())
    assert cosine(res.grad["log_l2"], reference.grad["log_l2"]) > 0.9
    assert res.stats["stored_state_bytes"] == 2 * 2 * 6 * 8


def test_approximate_but_informative_on_the_mlp():
    dyn, objective, lam = mlp_problem(steps=12)
    reference = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    res = hg.hypergrad(dyn, objective, lam, DrMAD())
    for group in ("log_l2", "log_scale", "example_logit"):
        assert cosine(res.grad[group], reference.grad[group]) > 0.9, group


def rosenbrock(steps):
    """SGD down Rosenbrock's curved valley from (−1, 1): the straight line from w_0 to w_T cuts
    across the valley, through curvature (−400 along x at (0, 1)) that training never meets."""
    dyn = hg.Dynamics(
        init=jnp.asarray([-1.0, 1.0]),
        loss=lambda w, lam, batch: (1 - w[0]) ** 2 + 100 * (w[1] - w[0] ** 2) ** 2,
        optimizer=hg.optim.sgd(),
        optimizer_hparams=lambda lam, t: {"lr": lam["lr"]},
        steps=steps,
    )
    return dyn, lambda w, lam: jnp.sum((w - 1.0) ** 2), {"lr": jnp.asarray(1.5e-3)}


def test_a_backward_pass_that_blows_up_is_refused_with_the_exact_alternative():
    dyn, objective, lam = rosenbrock(1000)
    sol = hg.value_and_grad(dyn, objective, lam, DrMAD())
    assert int(sol.result) == hg.Failure.APPROXIMATION_UNSTABLE
    assert float(sol.stats["backward_growth"]) > 1e60  # the gradient is ~1e77, the exact one −717
    with pytest.raises(hg.MethodError, match=r"DrMAD: the backward recursion .* grew .*hg.Reverse\(checkpoint_every"):
        hg.hypergrad(dyn, objective, lam, DrMAD())
    exact = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    assert exact.stats["backward_growth"] < 10
    overflowed = DrMAD().failure(hg.Failure.APPROXIMATION_UNSTABLE, {"backward_growth": np.inf})
    assert "path overflowed (largest" in str(overflowed) and "inf" not in str(overflowed)
    chaos = hg.Reverse().failure(hg.Failure.CHAOTIC, {"backward_growth": np.nan})
    assert "backward pass overflowed (largest" in str(chaos) and "nan" not in str(chaos)


def test_a_stable_backward_pass_reports_its_growth():
    dyn, objective, lam = rosenbrock(300)
    res = hg.hypergrad(dyn, objective, lam, DrMAD())
    assert 1 <= res.stats["backward_growth"] < DrMAD_UNSTABLE
