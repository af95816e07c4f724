"""Models as people write them: an Equinox model with its ``eqx.nn.State`` and a Flax NNX module,
each with BatchNorm and dropout, trained as they are; hypergradients against central differences."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hypergradient as hg
from problems import central_difference, random_direction, tree_dot

pytestmark = pytest.mark.filterwarnings("ignore:When `eqx.nn.BatchNorm")

D, H, N, T = 4, 6, 16, 8
LAM = {"log_lr": jnp.log(0.1), "log_l2": jnp.log(1e-2)}


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3 * N, D))
    y = np.tanh(x @ rng.normal(size=D))
    return jnp.asarray(x[:2 * N]), jnp.asarray(y[:2 * N]), jnp.asarray(x[2 * N:]), jnp.asarray(y[2 * N:])


X, Y, XV, YV = _data()
DATA = hg.Batches((X, Y), batch_size=N)


def hparams(lam, t):
    return {"lr": jnp.exp(lam["log_lr"]), "momentum": 0.5}


def l2(lam, params):
    return jnp.exp(lam["log_l2"]) * sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))


class EqxNet(eqx.Module):
    l1: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    drop: eqx.nn.Dropout
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(D, H, key=k1)
        self.bn = eqx.nn.BatchNorm(H, "batch")  # its running averages (the default mode, "ema")
        self.drop = eqx.nn.Dropout(0.2)
        self.l2 = eqx.nn.Linear(H, "scalar", key=k2)

    def __call__(self, x, state, key, inference=False):
        h, state = self.bn(self.l1(x), state, inference=inference)
        return self.l2(self.drop(jnp.tanh(h), key=key, inference=inference)), state


def eqx_problem():
    model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))

    def loss(model, lam, batch, *, state, key):
        x, y = batch
        keys = jax.random.split(key, x.shape[0])
        pred, state = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))(x, state, keys)
        return jnp.mean((pred - y) ** 2) + l2(lam, eqx.filter(model, eqx.is_inexact_array)), state

    def objective(model, lam, *, state):
        run = jax.vmap(lambda x: model(x, state, None, inference=True)[0])
        return jnp.mean((run(XV) - YV) ** 2)

    dyn = hg.Dynamics(init=model, loss=loss, optimizer=hg.optim.momentum(), optimizer_hparams=hparams,
                      data=DATA, steps=T, state=state, key=jax.random.key(1))
    return dyn, objective


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(D, H, rngs=rngs, param_dtype=jnp.float64)
        self.bn = nnx.BatchNorm(H, rngs=rngs, param_dtype=jnp.float64)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(H, 1, rngs=rngs, param_dtype=jnp.float64)
        for stat in (self.bn.mean, self.bn.var):  # NNX keeps them in float32 whatever param_dtype says
            stat.set_value(stat.get_value().astype(jnp.float64))

    def __call__(self, x):
        return self.l2(self.drop(jnp.tanh(self.bn(self.l1(x)))))[:, 0]


def nnx_problem(running=False):
    def loss(model, lam, batch):
        x, y = batch
        return jnp.mean((model(x) - y) ** 2) + l2(lam, nnx.state(model, nnx.Param))

    def objective(model, lam):
        if running:
            model.eval()  # running statistics, no dropout
        else:
            model.set_attributes(deterministic=True)  # no dropout, batch statistics
        return jnp.mean((model(XV) - YV) ** 2)

    dyn = hg.Dynamics(init=NnxNet(nnx.Rngs(0)), loss=loss, optimizer=hg.optim.momentum(),
                      optimizer_hparams=hparams, data=DATA, steps=T)
    return dyn, objective


@pytest.mark.parametrize("problem", [eqx_problem, nnx_problem], ids=["equinox", "nnx"])
def test_reverse_and_forward_agree_with_central_differences(problem):
    dyn, objective = problem()
    rev = hg.hypergrad(dyn, objective, LAM)
    fwd = hg.hypergrad(dyn, objective, LAM, hg.Forward())
    ckpt = hg.hypergrad(dyn, objective, LAM, hg.Reverse(checkpoint_every=3))
    v = random_direction(LAM)
    f = jax.jit(lambda lam: hg.value_and_grad(dyn, objective, lam).value)
    fd = central_difference(f, LAM, v)
    for res in (rev, fwd, ckpt):
        assert abs(tree_dot(res.grad, v) - fd) <= 1e-6 * max(1.0, abs(fd)), (res.stats["method"], fd)


def test_nnx_running_statistics_are_cut_by_flax():
    """Flax NNX's BatchNorm updates its running statistics under ``stop_gradient``: an objective
    that reads them sees no path from λ through them, in every method alike."""
    dyn, objective = nnx_problem(running=True)
    rev = hg.hypergrad(dyn, objective, LAM)
    for method in (hg.Forward(), hg.Reverse(checkpoint_every=3)):
        other = hg.hypergrad(dyn, objective, LAM, method)
        for a, b in zip(jax.tree.leaves(rev.grad), jax.tree.leaves(other.grad)):
            np.testing.assert_allclose(float(a), float(b), rtol=1e-10)


def test_nnx_module_comes_back_trained_with_its_state():
    dyn, objective = nnx_problem(running=True)
    res = hg.hypergrad(dyn, objective, LAM)
    model = res.params
    assert isinstance(model, NnxNet)
    assert float(jnp.abs(model.bn.mean.get_value()).sum()) > 0  # running statistics moved from zero
    assert not np.array_equal(np.asarray(model.l1.kernel.get_value()), np.asarray(dyn.init.l1.kernel.get_value()))
    assert int(model.drop.rngs.count.get_value()) == T  # one dropout draw per step: the RNG state is carried
    np.testing.assert_allclose(float(objective(model, LAM)), float(res.value), rtol=1e-12)


def test_equinox_state_comes_back():
    dyn, objective = eqx_problem()
    res = hg.hypergrad(dyn, objective, LAM)
    np.testing.assert_allclose(float(objective(res.params, LAM, state=res.state)), float(res.value), rtol=1e-12)


def test_an_online_checkpoint_holds_the_nnx_rng_key(tmp_path):
    """The online carry holds the module's typed PRNG key: written as key data, restored as a key."""
    import optax

    dyn, objective = nnx_problem(running=True)
    kwargs = dict(method=hg.Forward(), every=2, hyper_optimizer=optax.adam(0.01), progress=False,
                  checkpoint_dir=tmp_path)
    first = hg.online(dyn, objective, LAM, **kwargs)
    again = hg.online(dyn, objective, LAM, **kwargs)  # resumes from the finished run's checkpoint
    assert again.value == first.value
    assert int(again.params.drop.rngs.count.get_value()) == T
