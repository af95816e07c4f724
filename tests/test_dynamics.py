"""Dynamics, Batches and the errors a user meets first."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergradient as hg
from problems import mlp_problem, ridge_problem


def test_run_equals_a_python_loop_of_steps():
    dyn, _, lam = mlp_problem(steps=6)
    state, step = dyn.initial_state(lam), jax.jit(dyn.step)
    for t in range(dyn.steps):
        state, _ = step(state, lam, t)
    for a, b in zip(jax.tree.leaves(dyn.run(lam)), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)


def test_batches_in_order_follow_the_spec():
    x = jnp.arange(50.0)[:, None]
    batches = hg.Batches((x,), batch_size=20)
    assert batches.n_batches == 2  # the trailing 10 examples are never used
    np.testing.assert_array_equal(batches(0)[0][:, 0], np.arange(0, 20))
    np.testing.assert_array_equal(batches(1)[0][:, 0], np.arange(20, 40))
    np.testing.assert_array_equal(batches(2)[0][:, 0], np.arange(0, 20))
    np.testing.assert_array_equal(jax.jit(batches)(jnp.asarray(3))[0][:, 0], np.arange(20, 40))


def test_shuffled_batches_permute_each_epoch_reproducibly():
    n, bs = 40, 10
    batches = hg.Batches(jnp.arange(n), bs, key=jax.random.PRNGKey(3))
    epochs = [np.concatenate([np.asarray(batches(e * 4 + i)) for i in range(4)]) for e in range(3)]
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(np.asarray(jax.jit(batches)(jnp.asarray(5))), np.asarray(batches(5)))


def test_batches_reject_bad_input():
    with pytest.raises(ValueError, match="same leading"):
        hg.Batches((jnp.ones((10, 2)), jnp.ones(9)), 5)
    with pytest.raises(ValueError, match="batch_size"):
        hg.Batches(jnp.ones(10), 11)


def test_dynamics_is_a_pytree_with_static_functions():
    dyn, _, lam = mlp_problem(steps=4)
    leaves, treedef = jax.tree.flatten(dyn)
    again = jax.tree.unflatten(treedef, leaves)
    assert again.loss is dyn.loss and again.steps == 4
    assert all(isinstance(x, jax.Array) for x in leaves)  # data (and a fixed init) travel as arrays


def test_missing_and_unknown_optimizer_hyperparameters_are_named():
    dyn, objective, lam = ridge_problem()
    bad = hg.Dynamics(dyn.init, dyn.loss, hg.optim.momentum(), lambda lam, t: {"lr": 0.1}, dyn.data, 5)
    with pytest.raises(ValueError, match="momentum"):
        hg.hypergrad(bad, objective, lam)
    typo = hg.Dynamics(dyn.init, dyn.loss, hg.optim.sgd(), lambda lam, t: {"learning_rate": 0.1}, dyn.data, 5)
    with pytest.raises(ValueError, match="learning_rate"):
        typo.run(lam)


def test_invalid_arguments_raise_clear_errors():
    dyn, objective, lam = ridge_problem()
    with pytest.raises(ValueError, match="steps"):
        hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer, dyn.optimizer_hparams, dyn.data, steps=0)
    with pytest.raises(TypeError, match="optimizer"):
        hg.Dynamics(dyn.init, dyn.loss, "sgd", dyn.optimizer_hparams, dyn.data, steps=3)
    with pytest.raises(ValueError, match="scalar"):
        hg.hypergrad(dyn, lambda w, lam: w, lam)
    with pytest.raises(TypeError, match="floating point"):
        hg.hypergrad(dyn, objective, {"log_l2": jnp.asarray(-1), "lr": jnp.asarray(0.1)})
    with pytest.raises(TypeError, match="method"):
        hg.hypergrad(dyn, objective, lam, method="reverse")
    with pytest.raises(ValueError, match="checkpoint_every"):
        hg.Reverse(checkpoint_every=0)
    with pytest.raises(ValueError, match="positive int"):
        hg.Truncated(0)


def test_a_batch_that_does_not_fit_is_named():
    dyn, objective, lam = ridge_problem()
    x, y = dyn.data
    wrong = hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer, dyn.optimizer_hparams, (x[:, :3], y), 5)
    with pytest.raises(ValueError, match=r"batch of step 0 .*\(30, 3\)"):
        hg.hypergrad(wrong, objective, lam)


def test_a_per_layer_array_instead_of_a_list_is_explained():
    dyn, objective, lam = mlp_problem(steps=3, hparams=lambda lam, t: {"lr": lam["lr"][t], "momentum": 0.5})
    with pytest.raises(ValueError, match="as a list"):
        hg.hypergrad(dyn, objective, lam)


def test_divergence_names_the_first_nonfinite_step():
    dyn, objective, lam = ridge_problem(steps=200)
    lam = {**lam, "lr": jnp.asarray(100.0)}  # far above 2 / largest curvature
    with pytest.raises(hg.DivergenceError, match="step") as info:
        hg.hypergrad(dyn, objective, lam)
    assert 0 < info.value.step < 200
    with pytest.raises(hg.DivergenceError):
        dyn.run(lam)
    # the step is the first one whose loss is not finite
    state, losses, step = dyn.initial_state(lam), [], jax.jit(dyn.step)
    for t in range(200):
        state, loss = step(state, lam, t)
        losses.append(float(loss))
    assert np.isfinite(losses[info.value.step - 1]) and not np.isfinite(losses[info.value.step])


def test_data_as_a_plain_function_of_the_step():
    dyn, objective, lam = ridge_problem(steps=10)
    x, y = dyn.data

    def turning(t):  # every example at every step, in an order that turns with t (ignoring t is refused)
        return jnp.roll(x, t, axis=0), jnp.roll(y, t, axis=0)

    as_fn = hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer, dyn.optimizer_hparams, turning, 10)
    a = hg.hypergrad(dyn, objective, lam)
    b = hg.hypergrad(as_fn, objective, lam)
    np.testing.assert_allclose(float(a.grad["lr"]), float(b.grad["lr"]), rtol=1e-12)


def test_nan_in_the_data_or_in_lambda_is_named_before_training():
    from problems import ridge_problem

    dyn, objective, lam = ridge_problem(steps=5)
    with pytest.raises(ValueError, match=r"hyperparameter \['lr'\] holds nan"):
        hg.hypergrad(dyn, objective, {**lam, "lr": jnp.asarray(jnp.nan)})
    x, y = dyn.data
    bad = hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer, dyn.optimizer_hparams, (x.at[3, 1].set(jnp.inf), y), 5)
    with pytest.raises(ValueError, match=r"training data \[0\] holds inf \(first at index \(3, 1\)\)"):
        hg.hypergrad(bad, objective, lam)
    with pytest.raises(ValueError, match="training data"):
        hg.optimize(bad, objective, lam, hyper_steps=1)


def test_dynamics_is_immutable_and_replace_makes_a_checked_copy():
    dyn, objective, lam = ridge_problem(steps=5)
    with pytest.raises(AttributeError, match="replace"):
        dyn.steps = 3
    short = dyn.replace(steps=3)
    assert (short.steps, dyn.steps) == (3, 5) and short.loss is dyn.loss and short.data is dyn.data
    assert short.run(lam).shape == dyn.run(lam).shape
    with pytest.raises(ValueError, match="steps must be a positive int"):
        dyn.replace(steps=0)
    with pytest.raises(ValueError, match="steps"):
        dyn.replace(steps=True)
    with pytest.raises(TypeError, match="stepz"):
        dyn.replace(stepz=3)


def _kinds_problem(init, data):
    """Least squares on 6 examples, whatever the kind of ``init`` (weights under ``"w"`` but for a
    function) and of ``data`` (``None``: the loss holds the examples)."""
    x, y = jnp.arange(12.0).reshape(6, 2), jnp.arange(6.0)

    def loss(w, lam, batch):
        bx, by = (x, y) if batch is None else batch
        w = w["w"] if isinstance(w, dict) else w
        return jnp.mean((bx @ w - by) ** 2)

    return hg.Dynamics(init, loss, hg.optim.sgd(), lambda lam, t: {"lr": lam["lr"]}, data, steps=4)


@pytest.mark.parametrize("kind", ["batches", "function", "fixed", "none"])
def test_each_kind_of_data_is_normalized_once_and_given_back(kind, monkeypatch):
    from hypergradient import data as hg_data
    from hypergradient import dynamics

    x = jnp.arange(12.0).reshape(6, 2)
    y = jnp.arange(6.0)

    def turning(t):
        return jnp.roll(x, t, axis=0), jnp.roll(y, t, axis=0)

    given = {"batches": hg.Batches((x, y), 3), "function": turning, "fixed": (x, y), "none": None}[kind]
    calls, as_data = [], dynamics.as_data
    monkeypatch.setattr(dynamics, "as_data", lambda d: calls.append(d) or as_data(d))
    dyn = _kinds_problem(jnp.zeros(2), given)
    expected = {"batches": hg.Batches, "function": hg_data.Steps, "fixed": hg_data.Fixed, "none": hg_data.Fixed}
    assert type(dyn.batches) is expected[kind] and dyn.data is given
    lam = {"lr": jnp.asarray(0.01)}
    dyn.run(lam)
    hg.hypergrad(dyn, lambda w, lam: jnp.sum(w**2), lam)
    assert len(calls) == 1  # not again when the run is flattened, traced and compiled
    want = {"batches": (x[3:], y[3:]), "function": turning(1), "fixed": (x, y), "none": None}[kind]
    assert jax.tree.all(jax.tree.map(jnp.array_equal, jax.jit(dyn.batch)(jnp.asarray(1)), want))
    if kind == "function":
        assert jax.tree.leaves(dyn.batches) == [] and not hasattr(dyn.batches, "examples")
        with pytest.raises(hg.MethodError, match="whole training set"):
            hg.Implicit().check(dyn)
    else:
        assert jax.tree.all(jax.tree.map(jnp.array_equal, dyn.batches.examples, None if kind == "none" else (x, y)))


@pytest.mark.parametrize("kind", ["function", "weights", "model"])
def test_each_kind_of_init_is_normalized_once_and_given_back(kind, monkeypatch):
    from hypergradient import dynamics

    w0 = jnp.asarray([0.5, -1.0])
    given = {"function": lambda lam: w0 * lam["scale"], "weights": {"w": w0},
             "model": {"w": w0, "act": jnp.tanh}}[kind]
    calls, as_init = [], dynamics.as_init
    monkeypatch.setattr(dynamics, "as_init", lambda i: calls.append(i) or as_init(i))
    dyn = _kinds_problem(given, None)
    lam = {"lr": jnp.asarray(0.01), "scale": jnp.asarray(2.0)}
    assert type(dyn.initializer) is {"function": dynamics.Function}.get(kind, dynamics.Weights)
    assert (dyn.skeleton is None) == (kind != "model")
    assert dyn.init is given if kind != "model" else jax.tree.structure(dyn.init) == jax.tree.structure(given)
    w = dyn.initial_params(lam)
    np.testing.assert_array_equal(w if kind == "function" else w["w"], 2 * w0 if kind == "function" else w0)
    trained = dyn.run(lam)
    if kind == "model":
        assert trained["act"] is jnp.tanh  # the loss and the caller see the whole model
    hg.hypergrad(dyn, lambda w, lam: jnp.sum(w**2) if kind == "function" else jnp.sum(w["w"] ** 2), lam)
    assert len(calls) == 1

