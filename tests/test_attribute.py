"""Data attribution: each score is the derivative of the objective in one example's weight
(central finite differences), matches leave-one-out retraining to first order, and is zero for an
example no batch holds."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergradient as hg
from hypergradient.example_weights import weighted

TESTS = pathlib.Path(__file__).resolve().parent
N, D = 24, 4
_rng = np.random.default_rng(0)
X = _rng.normal(size=(N, D))
Y = (X @ _rng.normal(size=D) + 0.7 * _rng.normal(size=N) > 0).astype(float)
Y[:3] = 1 - Y[:3]  # a few flipped labels: scores of both signs
XV = _rng.normal(size=(10, D))
YV = (XV @ np.ones(D) > 0).astype(float)
LAM = {"l2": jnp.asarray(0.05)}
W0 = {"w": jnp.zeros(D), "b": jnp.zeros(())}


def per_example(w, x, y):
    z = x @ w["w"] + w["b"]
    return jnp.logaddexp(0.0, z) - y * z


def loss(w, lam, batch, *, example_weights=1.0):
    x, y = batch
    return jnp.mean(example_weights * per_example(w, x, y)) + 0.5 * lam["l2"] * jnp.sum(w["w"] ** 2)


def objective(w, lam):
    return jnp.mean(per_example(w, XV, YV))


def val_losses(w, lam):
    return per_example(w, XV, YV)


def momentum(lam, t):
    return {"lr": 1.0, "momentum": 0.5}


def dynamics(data, steps=40, optimizer=None, hparams=momentum):
    return hg.Dynamics(W0, loss, optimizer or hg.optim.momentum(), hparams, data=data, steps=steps)


def objectives_at(dyn, weights):
    """The objective after training with each row of ``weights`` as the example weights."""
    run = weighted(dyn)
    return np.asarray(jax.jit(jax.vmap(lambda u: objective(run.run((LAM, u)), LAM)))(jnp.asarray(weights)))


def central_differences(dyn, eps=1e-5):
    """The finite differences of every example's weight, and the objective at weights 1 (one program)."""
    bumps = np.eye(N) * eps
    f = objectives_at(dyn, np.concatenate([1 + bumps, 1 - bumps, np.ones((1, N))]))
    return (f[:N] - f[N:-1]) / (2 * eps), f[-1]


@pytest.mark.parametrize("data", ["full", "shuffled"])
def test_score_is_the_finite_difference_in_the_example_weight(data):
    source = (X, Y) if data == "full" else hg.Batches((X, Y), 8, key=jax.random.key(3))
    dyn = dynamics(source)
    res = hg.attribute(dyn, objective, LAM)
    fd, value = central_differences(dyn)
    assert res.scores.shape == (N,) and np.array_equal(res.indices, np.arange(N))
    np.testing.assert_allclose(res.scores, fd, rtol=1e-6, atol=1e-9)
    assert np.isclose(res.value, value)
    assert res.stats["seconds"] > 0 and res.stats["examples"] == N


def test_forward_over_reverse_gives_the_same_scores():
    """The example weights are λ, so forward-over-reverse backward steps (which give the data no
    cotangent) still differentiate in them: the scores equal reverse-over-reverse's."""
    dyn = dynamics(hg.Batches((X, Y), 8, key=jax.random.key(3)))
    plain = hg.attribute(dyn, objective, LAM)
    mixed = hg.attribute(dyn, objective, LAM, method=hg.Reverse(second_order="forward"))
    np.testing.assert_allclose(mixed.scores, plain.scores, rtol=1e-10, atol=1e-14)
    rows = hg.attribute(dyn, val_losses, LAM, method=hg.Reverse(second_order="forward"))
    np.testing.assert_allclose(rows.scores, hg.attribute(dyn, val_losses, LAM).scores, rtol=1e-10, atol=1e-14)


def test_scores_predict_leave_one_out_retraining():
    dyn = dynamics((X, Y), steps=150, optimizer=hg.optim.sgd(), hparams=lambda lam, t: {"lr": 2.0})
    scores = hg.attribute(dyn, objective, LAM).scores
    outcomes = objectives_at(dyn, np.concatenate([1 - np.eye(N), np.ones((1, N))]))
    loo = outcomes[:N] - outcomes[N]
    assert np.corrcoef(-scores, loo)[0, 1] >= 0.99
    assert np.sign(scores).min() < 0 < np.sign(scores).max()


def test_an_example_no_batch_holds_scores_zero():
    # 28 examples in batches of 8: the trailing 4 (a partial batch) are never trained on
    x = np.concatenate([X, X[:4] + 1.0])
    y = np.concatenate([Y, 1 - Y[:4]])
    data = hg.Batches((x, y), 8)
    dyn = dynamics(data, steps=12)
    seen = np.unique(np.concatenate([np.asarray(data.indices(jnp.asarray(t))) for t in range(12)]))
    assert seen.tolist() == list(range(24))
    scores = hg.attribute(dyn, objective, LAM).scores
    assert scores.shape == (28,)
    assert np.all(scores[24:] == 0) and np.all(scores[:24] != 0)


def one_val_loss(j, w, lam):
    return val_losses(w, lam)[j]


def test_vector_objective_gives_a_row_per_validation_example(tmp_path):
    dyn = dynamics(hg.Batches((X, Y), 8))
    rows = hg.attribute(dyn, val_losses, LAM, chunk_size=3)  # 10 rows: the last chunk is padded
    assert rows.scores.shape == (10, N) and rows.stats["chunks"] == 4
    for j in (0, 9):
        single = hg.attribute(dyn, jax.tree_util.Partial(one_val_loss, jnp.asarray(j)), LAM)
        np.testing.assert_allclose(rows.scores[j], single.scores, rtol=1e-10, atol=1e-14)
        assert np.isclose(rows.value[j], single.value)
    rows.save(tmp_path / "scores.npz")
    saved = np.load(tmp_path / "scores.npz")
    assert np.array_equal(saved["scores"], rows.scores) and np.array_equal(saved["indices"], np.arange(N))


def test_batches_ids_name_the_rows_of_the_batch():
    data = hg.Batches((X, Y), 8, key=jax.random.key(0))
    for t in (0, 1, 2, 3, 7):
        ids = np.asarray(data.indices(jnp.asarray(t)))
        np.testing.assert_array_equal(X[ids], np.asarray(data(jnp.asarray(t))[0]))


def test_checkpointed_reverse_and_a_run_with_state_and_key():
    """A run whose loss counts its calls in a model state and draws dropout from its key: the
    checkpointed scores equal finite differences of the same run."""

    def noisy_loss(w, lam, batch, *, state, key, example_weights=1.0):
        x, y = batch
        keep = jax.random.bernoulli(key, 0.8, x.shape) / 0.8
        value = jnp.mean(example_weights * per_example(w, x * keep, y)) + 0.5 * lam["l2"] * jnp.sum(w["w"] ** 2)
        return value, state + 1.0

    def stateful_objective(w, lam, *, state):
        return objective(w, lam) + 0.0 * state

    dyn = hg.Dynamics(W0, noisy_loss, hg.optim.adam(), lambda lam, t: {"lr": 0.1}, data=hg.Batches((X, Y), 8),
                      steps=12, state=jnp.zeros(()), key=jax.random.key(5))
    res = hg.attribute(dyn, stateful_objective, LAM, method=hg.Reverse(checkpoint_every=4))
    run = weighted(dyn)

    def f(u):
        return stateful_objective(run.run((LAM, u)), LAM, state=0.0)

    bumps = np.eye(N)[:6] * 1e-5
    outcomes = np.asarray(jax.jit(jax.vmap(f))(np.concatenate([1 + bumps, 1 - bumps])))
    fd = (outcomes[:6] - outcomes[6:]) / 2e-5
    np.testing.assert_allclose(res.scores[:6], fd, rtol=1e-5, atol=1e-9)


def test_refusals():
    dyn = dynamics((X, Y))
    with pytest.raises(hg.MethodError, match="Forward"):
        hg.attribute(dyn, objective, LAM, method=hg.Forward())
    with pytest.raises(TypeError, match="which training examples"):
        hg.attribute(dyn.replace(data=lambda t: (X, Y + 0 * t)), objective, LAM)

    def plain_loss(w, lam, batch):
        return jnp.mean(per_example(w, *batch))

    with pytest.raises(TypeError, match="example_weights"):
        hg.attribute(dyn.replace(loss=plain_loss), objective, LAM)


@pytest.mark.slow
def test_sharded_batches():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, TESTS / "programs" / "attribute_sharded.py"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("devices") == 4 and len(out) == 3
    assert all(v < 1e-6 for v in out.values()), out


def test_scores_at_subset_weights_are_finite_differences_there():
    dyn = dynamics((X, Y))
    u = np.ones(N)
    u[::3] = 0
    res = hg.attribute(dyn, objective, LAM, weights=u)
    bumps = np.eye(N)[:4] * 1e-5
    outcomes = objectives_at(dyn, np.concatenate([u + bumps, u - bumps]))
    np.testing.assert_allclose(res.scores[:4], (outcomes[:4] - outcomes[4:]) / 2e-5, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="one weight per training example"):
        hg.attribute(dyn, objective, LAM, weights=np.ones(N + 1))
