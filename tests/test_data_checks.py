"""A data function is traced once, not run at every step: one that reads host state when traced
(an iterator, a NumPy random draw) or ignores t would train every step on one batch, so it is
refused before training, by name; every legitimate source of batches is accepted."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergradient as hg
from hypergradient.data import Steps, _same_constant

N, B, T = 8, 2, 4
X = jnp.arange(2.0 * N).reshape(N, 2) / N
Y = jnp.sin(jnp.arange(1.0 * N))
KEY = jax.random.PRNGKey(0)


def loss(w, lam, batch):
    x, y = (X, Y) if batch is None else (batch[0], batch[1])
    return jnp.mean((x @ w - y) ** 2) + jnp.exp(lam["log_l2"]) * jnp.sum(w**2)


def objective(w, lam):
    return jnp.mean((X @ w - Y) ** 2)


def dynamics(data):
    return hg.Dynamics(jnp.zeros(2), loss, hg.optim.sgd(), lambda lam, t: {"lr": lam["lr"]}, data, steps=T)


LAM = {"log_l2": jnp.asarray(-1.0), "lr": jnp.asarray(0.1)}


def host_batches():
    """What a data loader yields: NumPy batches, one after another."""
    x, y = np.asarray(X), np.asarray(Y)
    for i in range(0, N, B):
        yield x[i:i + B], y[i:i + B]


def test_an_iterator_read_in_the_data_function_is_refused_by_name_before_training():
    it = host_batches()
    dyn = dynamics(lambda t: next(it))
    with pytest.raises(ValueError, match="host-side iterator cannot be replayed"):
        hg.hypergrad(dyn, objective, LAM)
    it = host_batches()
    dyn = dynamics(lambda t: next(it))
    with pytest.raises(ValueError, match="iterator"):
        hg.optimize(dyn, objective, LAM, hyper_optimizer=optax.sgd(0.1), hyper_steps=2)


def test_an_exhausted_iterator_is_named_not_a_stray_stopiteration():
    it = iter([])
    with pytest.raises(ValueError, match="raised StopIteration: a host-side iterator"):
        hg.hypergrad(dynamics(lambda t: next(it)), objective, LAM)


def test_an_iterator_given_as_data_itself_is_refused_at_construction():
    with pytest.raises(TypeError, match="data is an iterator \\(generator\\)"):
        dynamics(host_batches())


def test_a_host_side_random_draw_is_refused_even_when_the_batch_depends_on_t():
    rng = np.random.default_rng(0)
    scaled = dynamics(lambda t: (X[t] * rng.uniform(), Y[t]))  # depends on t, yet a new constant each trace
    drawn = dynamics(lambda t: (X[rng.integers(0, N, B)], Y[:B]))  # the indices are drawn on the host
    for dyn in (scaled, drawn):
        with pytest.raises(ValueError, match="two traces of data\\(t\\) gave different batches"):
            dyn.validate(LAM)


@pytest.mark.parametrize("data", [lambda t: (X, Y), lambda t: (X[:B], Y[:B], None),
                                  lambda t: (np.asarray(X), np.asarray(Y))],
                         ids=["closure", "with-none", "numpy"])
def test_a_data_function_that_ignores_t_is_refused(data):
    with pytest.raises(ValueError, match="does not depend on t, so it gives the same batch at every step: pass "
                                         "the batch itself as data=batch"):
        hg.hypergrad(dynamics(data), objective, LAM)


def _augmented(t):
    x = jax.lax.dynamic_slice_in_dim(X, (t * B) % N, B)
    noise = 0.01 * jax.random.normal(jax.random.fold_in(KEY, t), x.shape)
    return x + noise, jax.lax.dynamic_slice_in_dim(Y, (t * B) % N, B)


def _fresh_arrays(t):
    x, y = jnp.asarray(np.asarray(X)), jnp.asarray(np.asarray(Y))  # new arrays, equal values, at every trace
    return jnp.take(x, t % N, axis=0)[None], jnp.take(y, t % N, axis=0)[None]


LEGITIMATE = {
    "batches": hg.Batches((X, Y), B),
    "shuffled batches": hg.Batches((X, Y), B, key=KEY),
    "batches in a function": lambda t: hg.Batches((X, Y), B, key=KEY)(t),
    "dynamic_slice": lambda t: (jax.lax.dynamic_slice_in_dim(X, (t * B) % N, B),
                                jax.lax.dynamic_slice_in_dim(Y, (t * B) % N, B)),
    "take": lambda t: (jnp.take(X, jnp.arange(B) + t % (N // B) * B, axis=0),
                       jnp.take(Y, jnp.arange(B) + t % (N // B) * B, axis=0)),
    "fold_in augmentation": _augmented,
    "arrays made at every trace": _fresh_arrays,
    "a key per step beside a fixed batch": lambda t: (X, Y, jax.random.fold_in(jax.random.key(1), t)),
    "none in the batch": lambda t: (X[t % N][None], Y[t % N][None], None),
    "only none": lambda t: None,
    "fixed": (X, Y),
    "no data": None,
}


@pytest.mark.parametrize("name", LEGITIMATE)
def test_legitimate_data_is_accepted(name):
    dynamics(LEGITIMATE[name]).validate(LAM)


@pytest.mark.parametrize("name", ["shuffled batches", "fold_in augmentation", "none in the batch"])
def test_legitimate_data_functions_train_and_differentiate(name):
    res = hg.hypergrad(dynamics(LEGITIMATE[name]), objective, LAM)
    assert np.isfinite(float(res.value)) and all(np.isfinite(float(g)) for g in jax.tree.leaves(res.grad))


def test_constants_are_compared_by_value_keys_by_their_data():
    assert _same_constant(np.arange(3.0), jnp.arange(3.0).__array__())
    assert _same_constant(np.asarray([np.nan, 1.0]), np.asarray([np.nan, 1.0]))
    assert not _same_constant(np.arange(3), np.arange(3.0))
    assert not _same_constant(np.zeros(3), np.zeros(4))
    assert _same_constant(jax.random.key(0), jax.random.key(0))
    assert not _same_constant(jax.random.key(0), jax.random.key(1))


def test_the_check_traces_the_data_function_twice_and_runs_nothing():
    calls = []
    Steps(lambda t: calls.append(type(t)) or (X[t], Y[t])).check()
    assert len(calls) == 2 and all(issubclass(c, jax.core.Tracer) for c in calls)
