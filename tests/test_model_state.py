"""Real training runs: a model state (BatchNorm's running statistics) and per-step keys (dropout)
carried through every method, against a plain-JAX unrolled reference and central differences."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergradient as hg
from problems import central_difference, random_direction, tree_dot

T, N, D, H = 12, 16, 5, 6
KEY = jax.random.key(3)


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3 * N, D))
    y = np.tanh(x @ rng.normal(size=D)) + 0.1 * rng.normal(size=3 * N)
    return jnp.asarray(x[:2 * N]), jnp.asarray(y[:2 * N]), jnp.asarray(x[2 * N:]), jnp.asarray(y[2 * N:])


X, Y, XV, YV = _data()
W0 = {"W": 0.3 * jax.random.normal(jax.random.key(0), (D, H), jnp.float64),
      "b": jnp.zeros(H), "v": 0.3 * jax.random.normal(jax.random.key(1), (H,), jnp.float64)}
S0 = {"mean": jnp.zeros(H), "var": jnp.ones(H), "count": jnp.zeros((), jnp.int32)}
LAM = {"log_lr": jnp.log(0.2), "log_l2": jnp.log(1e-2), "logit_keep": jnp.asarray(1.5)}


def forward(w, x, mean, var, mask):
    h = (x @ w["W"] + w["b"] - mean) / jnp.sqrt(var + 1e-3)
    return jnp.tanh(h) * mask @ w["v"]


def stats(w, x):
    h = x @ w["W"] + w["b"]
    return jnp.mean(h, 0), jnp.var(h, 0)


def batch_loss(w, lam, batch, state, key):
    """A BatchNorm-like layer (batch statistics in training, running ones updated) and dropout."""
    x, y = batch
    mean, var = stats(w, x)
    keep = jax.nn.sigmoid(lam["logit_keep"])
    mask = jax.random.bernoulli(key, 0.8, (x.shape[0], H)) * keep / 0.8  # the keep scale is a hyperparameter
    loss = jnp.mean((forward(w, x, mean, var, mask) - y) ** 2) + jnp.exp(lam["log_l2"]) * jnp.sum(w["W"] ** 2)
    new = {"mean": 0.8 * state["mean"] + 0.2 * mean, "var": 0.8 * state["var"] + 0.2 * var,
           "count": state["count"] + 1}
    return loss, new


def loss(w, lam, batch, *, state, key):
    return batch_loss(w, lam, batch, state, key)


def objective(w, lam, *, state):
    return jnp.mean((forward(w, XV, state["mean"], state["var"], 1.0) - YV) ** 2)


def batch_of(t):
    i = (t % 2) * N
    return jax.lax.dynamic_slice_in_dim(X, i, N), jax.lax.dynamic_slice_in_dim(Y, i, N)


def hparams(lam, t):
    return {"lr": jnp.exp(lam["log_lr"]), "momentum": 0.5}


def dynamics(**changes):
    dyn = hg.Dynamics(init=W0, loss=loss, optimizer=hg.optim.momentum(), optimizer_hparams=hparams,
                      data=batch_of, steps=T, state=S0, key=KEY)
    return dyn.replace(**changes) if changes else dyn


def reference(lam):
    """The same run written out in plain JAX: heavy-ball momentum, keys fold_in(KEY, t)."""

    def step(carry, t):
        w, v, s = carry
        (_, s2), g = jax.value_and_grad(batch_loss, has_aux=True)(w, lam, batch_of(t), s, jax.random.fold_in(KEY, t))
        v = jax.tree.map(lambda v, g: 0.5 * v + g, v, g)
        w = jax.tree.map(lambda w, v: w - jnp.exp(lam["log_lr"]) * v, w, v)
        return (w, v, s2), None

    (w, _, s), _ = jax.lax.scan(step, (W0, jax.tree.map(jnp.zeros_like, W0), S0), jnp.arange(T))
    return objective(w, lam, state=s)


REF_VALUE, REF_GRAD = jax.jit(jax.value_and_grad(reference))(LAM)


def assert_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-13)


@pytest.mark.parametrize("method", [hg.Reverse(), hg.Reverse(checkpoint_every=5), hg.Reverse(checkpoint_every=(6, 2)),
                                    hg.Forward(), hg.Truncated(T)], ids=repr)
def test_every_method_equals_the_unrolled_reference(method):
    res = hg.hypergrad(dynamics(), objective, LAM, method)
    np.testing.assert_allclose(float(res.value), float(REF_VALUE), rtol=1e-12)
    assert_close(res.grad, REF_GRAD, 1e-9)
    assert int(res.state["count"]) == T  # the model state at the end comes back


def test_reverse_agrees_with_central_differences():
    dyn = dynamics()
    res = hg.hypergrad(dyn, objective, LAM)
    v = random_direction(LAM)
    f = jax.jit(lambda lam: hg.value_and_grad(dyn, objective, lam).value)
    fd = central_difference(f, LAM, v)
    assert abs(tree_dot(res.grad, v) - fd) <= 1e-6 * max(1.0, abs(fd))


def test_the_running_statistics_carry_the_dependence_on_lambda():
    """Objective through the state only: without differentiating the state, ∂/∂ log_lr would be lost."""
    through_state = hg.hypergrad(dynamics(), lambda w, lam, state: jnp.sum(state["mean"] ** 2), LAM)
    assert abs(float(through_state.grad["log_lr"])) > 1e-6


@pytest.mark.slow
def test_checkpointed_reverse_replays_the_run():
    """The recomputed segments draw the same keys from the same states: another dropout mask would
    move the losses by O(1). They agree to rounding, not bit for bit: XLA fuses the segmented
    program's steps differently (about 1 ulp), and the hypergradient sums its terms per segment."""
    dyn = dynamics()
    plain = hg.hypergrad(dyn, objective, LAM, hg.Reverse())
    for method in (hg.Reverse(checkpoint_every=4), hg.Reverse(checkpoint_every=(6, 3))):
        again = hg.hypergrad(dyn, objective, LAM, method)
        assert_close((again.value, again.losses, again.params, again.state, again.grad),
                     (plain.value, plain.losses, plain.params, plain.state, plain.grad), 1e-13)


def test_the_key_matters_and_is_replayed():
    """Another key is another run; the same key twice is the same run."""
    a = hg.hypergrad(dynamics(), objective, LAM)
    b = hg.hypergrad(dynamics(key=jax.random.key(4)), objective, LAM)
    c = hg.hypergrad(dynamics(key=jax.random.key(3)), objective, LAM)
    assert float(a.value) != float(b.value)
    assert float(a.value) == float(c.value)


def test_under_jit_and_vmap():
    dyn = dynamics()
    lams = jax.tree.map(lambda x: jnp.stack([x, x + 0.1]), LAM)
    sols = jax.jit(jax.vmap(lambda lam: hg.value_and_grad(dyn, objective, lam)))(lams)
    second = jax.tree.map(lambda x: x[1], lams)
    alone = hg.hypergrad(dyn, objective, second)
    np.testing.assert_allclose(float(sols.value[1]), float(alone.value), rtol=1e-12)
    assert_close(jax.tree.map(lambda x: x[1], sols.grad), alone.grad, 1e-10)
    assert sols.state["mean"].shape == (2, H)


def test_key_alone_serves_reversible():
    """Dropout keys without a model state: Reversible replays them on its way back."""

    def plain_loss(w, lam, batch, *, key):
        return batch_loss(w, lam, batch, S0, key)[0]

    def plain_objective(w, lam):
        return objective(w, lam, state=S0)

    dyn = hg.Dynamics(init=W0, loss=plain_loss, optimizer=hg.optim.momentum(), optimizer_hparams=hparams,
                      data=batch_of, steps=T, key=KEY)
    exact = hg.hypergrad(dyn, plain_objective, LAM)
    rev = hg.hypergrad(dyn, plain_objective, LAM, hg.Reversible())
    assert_close(rev.grad, exact.grad, 1e-6)


@pytest.mark.parametrize("method", [hg.Forward(), hg.Truncated(3)], ids=repr)
def test_online_replays_the_run(method):
    """With a hyper learning rate of zero, RTHO and TRHO train exactly the run at λ."""
    res = hg.online(dynamics(), objective, LAM, method=method, every=4, hyper_optimizer=optax.sgd(0.0), progress=False)
    np.testing.assert_allclose(res.value, float(REF_VALUE), rtol=1e-12)
    assert int(res.state["count"]) == T


def test_populations_carry_the_state():
    lams = jax.tree.map(lambda x: jnp.stack([x, x]), LAM)
    res = hg.optimize(dynamics(), objective, lams, hyper_steps=1, hyper_optimizer=optax.sgd(0.0),
                      population_axis=0, progress=False)
    np.testing.assert_allclose(res.value, float(REF_VALUE), rtol=1e-12)
    assert int(res.state["count"]) == T


def test_methods_that_cannot_carry_a_state_say_so():
    with pytest.raises(hg.MethodError, match="model state"):
        hg.hypergrad(dynamics(), objective, LAM, hg.Reversible())
    with pytest.raises(hg.MethodError, match="Implicit"):
        hg.hypergrad(dynamics(data=(X, Y)), objective, LAM, hg.Implicit())


def test_a_loss_that_forgets_the_state_is_named():
    with pytest.raises(TypeError, match=r"return \(value, new_state\)"):
        hg.hypergrad(dynamics(loss=lambda w, lam, batch, state, key: batch_loss(w, lam, batch, state, key)[0]),
                     objective, LAM)
    with pytest.raises(ValueError, match="must keep its form"):
        hg.hypergrad(dynamics(loss=lambda w, lam, b, state, key: (batch_loss(w, lam, b, state, key)[0],
                                                                   {**state, "mean": state["mean"][:2]})),
                     objective, LAM)
    with pytest.raises(TypeError, match="jax.random key"):
        dynamics(key=3)
