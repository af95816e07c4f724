import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from hypergradient.apps import models


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def np_cnn(params, x, image_shape):
    """Reference CNN: explicit 3x3 cross-correlation, SiLU, 2x2 average pooling."""
    p = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in params]
    x = np.asarray(x, np.float64).reshape(len(x), *image_shape, 1)
    for layer in p[:-1]:
        n, h, w, _ = x.shape
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = np.zeros((n, h, w, layer["W"].shape[-1]))
        for di in range(3):
            for dj in range(3):
                out += padded[:, di : di + h, dj : dj + w, :] @ layer["W"][di, dj]
        z = out + layer["b"]
        x = z / (1 + np.exp(-z))
        h2, w2 = h // 2, w // 2
        x = sum(x[:, i : 2 * h2 : 2, j : 2 * w2 : 2] for i in (0, 1) for j in (0, 1)) / 4
    return x.reshape(len(x), -1) @ p[-1]["W"] + p[-1]["b"]


def test_mlp_shapes_and_apply():
    params = models.mlp_init(jax.random.key(0), (7, 5, 3))
    assert [(l["W"].shape, l["b"].shape) for l in params] == [((7, 5), (5,)), ((5, 3), (3,))]
    assert all(l["W"].dtype == jnp.float32 and not l["b"].any() for l in params)
    params[0]["b"] = jnp.arange(5.0)  # a nonzero bias, to check it is used
    x = np.random.default_rng(0).standard_normal((4, 7)).astype(np.float32)
    w1, b1, w2, b2 = (np.asarray(params[i][k]) for i in (0, 1) for k in ("W", "b"))
    expected = np.tanh(x @ w1 + b1) @ w2 + b2
    np.testing.assert_allclose(models.mlp_apply(params, x), expected, rtol=1e-5)
    relu = models.mlp_apply(params, x, activation=jax.nn.relu)
    np.testing.assert_allclose(relu, np.maximum(x @ w1 + b1, 0) @ w2 + b2, rtol=1e-5, atol=1e-6)


def test_mlp_init_statistics():
    (layer,) = models.mlp_init(jax.random.key(1), (1000, 1000))
    scaled = np.asarray(layer["W"]) * math.sqrt(1000)
    assert abs(scaled.std() - 1) < 0.01 and abs(scaled.mean()) < 0.01
    (small,) = models.mlp_init(jax.random.key(1), (10, 1000))
    assert abs(np.asarray(small["W"]).std() * math.sqrt(10) - 1) < 0.02
    (half,) = models.mlp_init(jax.random.key(1), (3, 2), dtype=jnp.bfloat16)
    assert half["W"].dtype == half["b"].dtype == jnp.bfloat16


def test_softmax_regression():
    params = models.softmax_regression_init(6, 4)
    assert [(l["W"].shape, l["b"].shape) for l in params] == [((6, 4), (4,))]
    x = jnp.ones((3, 6))
    logits = models.softmax_regression_apply(params, x)
    loss = models.cross_entropy(logits, jnp.array([0, 1, 3]))
    np.testing.assert_allclose(loss, math.log(4), rtol=1e-6)
    params = [{"W": jnp.arange(24.0).reshape(6, 4), "b": jnp.array([1.0, 0, 0, -1])}]
    expected = x @ params[0]["W"] + params[0]["b"]
    np.testing.assert_allclose(models.softmax_regression_apply(params, x), expected)


@pytest.mark.parametrize("image_shape", [(8, 8), (28, 28), (7, 10)])
def test_cnn_against_reference(image_shape):
    params = models.cnn_init(jax.random.key(2), image_shape, 10, channels=(3, 4))
    h, w = image_shape[0] // 4, image_shape[1] // 4
    assert [l["W"].shape for l in params] == [(3, 3, 1, 3), (3, 3, 3, 4), (h * w * 4, 10)]
    assert [l["b"].shape for l in params] == [(3,), (4,), (10,)]
    # Nonzero biases of both signs so that relu clips some units.
    keys = jax.random.split(jax.random.key(4), len(params))
    params = [dict(l, b=0.1 * jax.random.normal(k, l["b"].shape)) for k, l in zip(keys, params)]
    x = jax.random.uniform(jax.random.key(3), (5, image_shape[0] * image_shape[1]))
    square = image_shape[0] == image_shape[1]
    logits = jax.jit(models.cnn_apply, static_argnums=2)(params, x, None if square else image_shape)
    assert logits.shape == (5, 10)
    np.testing.assert_allclose(logits, np_cnn(params, x, image_shape), rtol=1e-4, atol=1e-5)


def test_cnn_errors_and_init_statistics():
    with pytest.raises(ValueError, match="not a square"):
        params = models.cnn_init(jax.random.key(0), (7, 10), 10, (3, 4))
        models.cnn_apply(params, jnp.zeros((2, 70)))
    with pytest.raises(ValueError, match="too small"):
        models.cnn_init(jax.random.key(0), (3, 8), 3)
    params = models.cnn_init(jax.random.key(0), (8, 8), 10, channels=(64, 128))
    scaled = np.asarray(params[1]["W"]) * math.sqrt(9 * 64)
    assert abs(scaled.std() - 1) < 0.02 and abs(scaled.mean()) < 0.02


@pytest.mark.slow
def test_cnn_derivatives_forward_and_reverse():
    with jax.enable_x64(True):
        params = models.cnn_init(jax.random.key(0), (8, 8), 3, channels=(2, 2), dtype=jnp.float64)
        x = jax.random.uniform(jax.random.key(1), (2, 64), jnp.float64)
        y = jnp.array([0, 2])
        loss = jax.jit(lambda p: models.cross_entropy(models.cnn_apply(p, x), y))
        check_grads(loss, (params,), order=2, modes=("fwd", "rev"))


def test_cross_entropy_against_numpy():
    rng = np.random.default_rng(0)
    logits = 30 * rng.standard_normal((50, 7)).astype(np.float32)  # large: needs a stable softmax
    y = rng.integers(0, 7, 50)
    per_example = -np_log_softmax(logits)[np.arange(50), y]
    np.testing.assert_allclose(models.cross_entropy(logits, y), per_example.mean(), rtol=1e-5)
    w = rng.uniform(0, 2, 50)
    weighted = models.cross_entropy(logits, y, w)
    np.testing.assert_allclose(weighted, (w * per_example).sum() / 50, rtol=1e-5)
    ones = models.cross_entropy(logits, y, jnp.ones(50))
    np.testing.assert_allclose(ones, models.cross_entropy(logits, y), rtol=1e-6)
    # d loss / d weight_i is example i's own loss over N: what hyper-cleaning needs.
    grad = jax.grad(lambda w: models.cross_entropy(logits, y, w))(jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(grad, per_example / 50, rtol=1e-5, atol=1e-7)


def test_accuracy_and_error_rate():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
    y = jnp.array([0, 1, 0, 2])
    assert float(models.accuracy(logits, y)) == 0.5
    assert float(models.error_rate(logits, y)) == 0.5
    assert float(models.accuracy(logits, jnp.array([0, 1, 2, 0]))) == 1.0


def test_l2_penalty():
    params = [
        {"W": jnp.array([[1.0, 2.0], [3.0, 0.0]]), "b": jnp.array([100.0, 100.0])},
        {"W": jnp.array([[0.5], [-1.0]]), "b": jnp.array([100.0])},
    ]
    # ||W_0||^2 = 1 + 4 + 9 = 14, ||W_1||^2 = 0.25 + 1 = 1.25; biases ignored.
    np.testing.assert_allclose(models.l2_penalty(params, [0.5, 2.0]), 0.5 * 14 + 2.0 * 1.25)
    np.testing.assert_allclose(models.l2_penalty(params, 0.1), 0.1 * 15.25, rtol=1e-6)
    np.testing.assert_allclose(models.l2_penalty(params, jnp.array([1.0, 0.0])), 14.0)
    grad = jax.grad(models.l2_penalty, argnums=1)(params, [0.5, 2.0])
    np.testing.assert_allclose(grad, [14.0, 1.25])
    with pytest.raises(ValueError, match="one strength per layer"):
        models.l2_penalty(params, [1.0, 2.0, 3.0])
