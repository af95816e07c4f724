"""On a chaotic run (gradient descent that is the logistic map at r = 3.9) the exact hypergradient
overflows float32 while training stays finite: the error says so and names hg.ES, whose estimate
of the smoothed objective's gradient stays finite."""

import jax.numpy as jnp
import numpy as np
import pytest

import hypergradient as hg

R = 3.9


def _loss(w, lam, batch):
    # ∂/∂x = x − R·x(1 − x), so one SGD step at lr 1 is the logistic map x ← R·x(1 − x)
    return w["x"] ** 2 / 2 - R * (w["x"] ** 2 / 2 - w["x"] ** 3 / 3)


DYN = hg.Dynamics(init={"x": jnp.float32(0.3)}, loss=_loss, optimizer=hg.optim.sgd(),
                  optimizer_hparams=lambda lam, t: {"lr": lam}, data=lambda t: None, steps=300)


def _objective(w, lam):
    return w["x"]


def test_overflowing_hypergradient_names_es():
    assert 0 < float(DYN.run(jnp.float32(1.0))["x"]) < 1
    with pytest.raises(hg.errors.DivergenceError, match=r"chaotic.*hg\.ES"):
        hg.hypergrad(DYN, _objective, jnp.float32(1.0), method=hg.Reverse())
    res = hg.hypergrad(DYN, _objective, jnp.float32(1.0), method=hg.ES(sigma=0.01, pairs=8))
    assert np.isfinite(float(res.grad))


def test_auto_on_a_chaotic_run_names_es():
    with pytest.raises(hg.errors.DivergenceError, match=r"chaotic.*hg\.ES"):
        hg.hypergrad(DYN, _objective, jnp.float32(1.0), method=hg.Auto())
