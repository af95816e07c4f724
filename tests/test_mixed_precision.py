"""Mixed precision: ``Reverse(adjoint_dtype=)`` against plain Reverse and against an independent
float64 reference of the same bfloat16 run, and float16 loss scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergradient as hg
from hypergradient.dynamics import State

T, N = 12, 48


def _data():
    x = jax.random.normal(jax.random.PRNGKey(0), (N, 6), jnp.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(jnp.int32)
    return x, y


def _w0(dtype):
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    return {"W1": (jax.random.normal(k1, (6, 8)) * 0.4).astype(dtype),
            "W2": (jax.random.normal(k2, (8, 3)) * 0.4).astype(dtype)}


def _loss(w, lam, batch, compute=None):
    """Cross-entropy of a tanh net plus weight decay; computes in ``compute`` (through
    ``to_compute``, which the float32 adjoint redirects) or, when None, in the weights' dtype."""
    x, y = batch
    if compute is None:
        x = x.astype(jax.tree.leaves(w)[0].dtype)
    else:
        w, x = hg.precision.to_compute((w, x), compute)
    logits = (jnp.tanh(x @ w["W1"]) @ w["W2"]).astype(jnp.float32)
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
    return ce + jnp.exp(lam["log_wd"]) * sum(jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree.leaves(w))


def _bf16_compute_loss(w, lam, batch):
    return _loss(w, lam, batch, jnp.bfloat16)


def _objective(w, lam):
    x, y = _data()
    return _loss(w, {"log_wd": jnp.asarray(-30.0)}, (-x, y))


def _hparams(lam, t):
    return {"lr": jnp.exp(lam["log_lr"]) * lam["schedule"][t], "momentum": 0.8}


def _lam(dtype=jnp.float32):
    return {"log_lr": jnp.asarray(np.log(0.5), dtype), "log_wd": jnp.asarray(-3.0, dtype),
            "schedule": jnp.linspace(1.0, 0.2, T).astype(dtype)}


def _dyn(weights, loss, optimizer=None):
    return hg.Dynamics(_w0(weights), loss, optimizer or hg.optim.momentum(), _hparams, data=_data(), steps=T)


def _flat(g):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(g)])


def _rel(a, b):
    a, b = _flat(a), _flat(b)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
@pytest.mark.parametrize("every", [None, 5])
def test_float32_run_float32_adjoint_is_reverse(optimizer, every):
    opt = hg.optim.momentum() if optimizer == "momentum" else hg.optim.adam()
    hparams = _hparams if optimizer == "momentum" else (lambda lam, t: {"lr": 0.05 * _hparams(lam, t)["lr"]})
    dyn = hg.Dynamics(_w0(jnp.float32), _loss, opt, hparams, data=_data(), steps=T)
    plain = hg.hypergrad(dyn, _objective, _lam())
    ours = hg.hypergrad(dyn, _objective, _lam(), hg.Reverse(checkpoint_every=every, adjoint_dtype=jnp.float32))
    assert ours.value == plain.value
    for a, b in zip(jax.tree.leaves(ours.grad), jax.tree.leaves(plain.grad)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(ours.stats["backward_growth"], plain.stats["backward_growth"], rtol=1e-4)


def _reference(dyn, lam):
    """∂E/∂λ in float64 of the bfloat16 run ``dyn``, its roundings taken as the identity, by plain
    autodiff of a straight-through run: each state is the float64 step at the previous state plus
    a stop-gradient correction to the bfloat16 run's own next state."""
    lam32 = jax.tree.map(lambda a: a.astype(jnp.float32), lam)
    s0 = dyn.initial_state(lam32)

    def f(lam64):
        def body(s64, t):
            s = jax.tree.map(lambda a, r: a.astype(r.dtype), jax.lax.stop_gradient(s64), s0)
            run, _ = dyn.step(s, lam32, t)
            with hg.precision.adjoint_precision(jnp.float64):
                exact, _ = dyn.step(s64, lam64, t)
            return jax.tree.map(lambda e, r: e + jax.lax.stop_gradient(r.astype(jnp.float64) - e), exact, run), None

        sT, _ = jax.lax.scan(body, jax.tree.map(lambda a: a.astype(jnp.float64), s0), jnp.arange(T))
        with hg.precision.adjoint_precision(jnp.float64):
            return _objective(sT.params, lam64)

    return jax.jit(jax.grad(f))(jax.tree.map(lambda a: a.astype(jnp.float64), lam))


@pytest.mark.parametrize("case", ["bf16 weights", "bf16 compute"])
def test_float32_adjoint_is_closer_to_the_exact_hypergradient_of_the_bf16_run(case):
    dyn = _dyn(jnp.bfloat16, _loss) if case == "bf16 weights" else _dyn(jnp.float32, _bf16_compute_loss)
    lam = _lam()
    exact = _reference(dyn, lam)
    plain = hg.hypergrad(dyn, _objective, lam)
    ours = hg.hypergrad(dyn, _objective, lam, hg.Reverse(adjoint_dtype=jnp.float32))
    # the same run, up to XLA rounding bfloat16 at other places in another program
    np.testing.assert_allclose(ours.value, plain.value, rtol=1e-2)
    err_plain, err_ours = _rel(plain.grad, exact), _rel(ours.grad, exact)
    # the float32 adjoint loses only float32's rounding; plain bfloat16 autodiff loses bfloat16's
    assert err_ours < 1e-3, (err_ours, err_plain)
    assert err_ours < err_plain / 10, (err_ours, err_plain)


def test_adjoint_dtype_is_checked():
    with pytest.raises(ValueError, match="floating-point"):
        hg.Reverse(adjoint_dtype=jnp.int32)
    with pytest.raises(ValueError, match="nested"):
        hg.Reverse(checkpoint_every=(8, 2), adjoint_dtype=jnp.float32)
    assert hg.Reverse(adjoint_dtype=jnp.float32) == hg.Reverse(adjoint_dtype="float32")


def test_to_compute_follows_the_adjoint_precision():
    tree = (jnp.ones(2, jnp.float32), jnp.arange(2))
    w, i = hg.precision.to_compute(tree)
    assert w.dtype == jnp.bfloat16 and i.dtype == tree[1].dtype
    with hg.precision.adjoint_precision(jnp.float32):
        assert hg.precision.to_compute(tree)[0].dtype == jnp.float32
    assert hg.precision.compute_dtype() == jnp.bfloat16


# ---------------------------------------------------------------- float16 loss scaling

SCALE = 2.0**12


def _f16_loss(w, lam, batch, scale=1.0):
    """A loss whose float16 backward pass underflows: its gradient is ~1e-6 per example."""
    x, y = batch
    w16, x16 = hg.precision.to_compute((w, x), jnp.float16)
    pred = (jnp.tanh(x16 @ w16["W1"]) @ w16["W2"])[:, 0].astype(jnp.float32)
    return scale * 1e-4 * jnp.mean(jnp.square(pred - y))


def _f32_loss(w, lam, batch):
    x, y = batch
    pred = (jnp.tanh(x @ w["W1"]) @ w["W2"])[:, 0]
    return 1e-4 * jnp.mean(jnp.square(pred - y))


def _regression_objective(w, lam):
    x, y = _data()
    return jnp.mean(jnp.square((jnp.tanh(x @ w["W1"]) @ w["W2"])[:, 0] - y))


def test_float16_needs_loss_scaling():
    data = (_data()[0], _data()[1].astype(jnp.float32))
    lam = {"lr": jnp.full(T, 300.0, jnp.float32)}
    hparams = lambda lam, t: {"lr": lam["lr"][t]}  # noqa: E731

    def run(loss, optimizer):
        dyn = hg.Dynamics(_w0(jnp.float32), loss, optimizer, hparams, data=data, steps=T)
        return hg.hypergrad(dyn, _regression_objective, lam)

    f32 = run(_f32_loss, hg.optim.sgd())
    scaled = run(lambda w, lam, b: _f16_loss(w, lam, b, SCALE), hg.optim.loss_scaled(hg.optim.sgd(), SCALE))
    unscaled = run(_f16_loss, hg.optim.sgd())
    assert _rel(scaled.grad, f32.grad) < 2e-2
    assert _rel(unscaled.grad, f32.grad) > 5 * _rel(scaled.grad, f32.grad)
    np.testing.assert_allclose(scaled.losses, SCALE * f32.losses, rtol=2e-2)
    with pytest.raises(ValueError, match="positive"):
        hg.optim.loss_scaled(hg.optim.sgd(), 0.0)
