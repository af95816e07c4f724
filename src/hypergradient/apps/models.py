"""Small reference models as pure functions of a weight pytree.

Every model's weights are a list with one dict per layer, ``[{"W": ..., "b":
...}, ...]``, so a per-layer hyperparameter (a learning rate, an L2 strength)
is a list of scalars, a pytree prefix of the weights. All functions are
differentiable to any order in both forward and reverse mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Params = list  # list of {"W": array, "b": array}, one dict per layer


def _dense_init(key: jax.Array, fan_in: int, shape: tuple[int, ...], dtype) -> dict:
    """W ~ N(0, 1) / sqrt(fan_in), b = 0."""
    w = jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)
    return {"W": w, "b": jnp.zeros(shape[-1], dtype)}


def mlp_init(key: jax.Array, sizes: Sequence[int], dtype=jnp.float32) -> Params:
    """Initialises a multilayer perceptron as in Maclaurin et al. (2015, §3.1).

    Args:
      key: PRNG key.
      sizes: layer widths, input first and output last, e.g. ``(784, 100, 10)``.
      dtype: floating dtype of the weights.

    Returns:
      ``len(sizes) - 1`` layers ``{"W": (fan_in, fan_out), "b": (fan_out,)}``
      with ``W ~ N(0, 1) / sqrt(fan_in)`` and ``b = 0``.
    """
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        _dense_init(k, n_in, (n_in, n_out), dtype)
        for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])
    ]


def mlp_apply(
    params: Params, x: jax.Array, activation: Callable[[jax.Array], jax.Array] = jnp.tanh
) -> jax.Array:
    """Applies a multilayer perceptron.

    Args:
      params: weights from :func:`mlp_init`.
      x: inputs of shape ``(N, sizes[0])``.
      activation: nonlinearity between layers (none after the last).

    Returns:
      Logits of shape ``(N, sizes[-1])``.
    """
    for layer in params[:-1]:
        x = activation(x @ layer["W"] + layer["b"])
    return x @ params[-1]["W"] + params[-1]["b"]


def softmax_regression_init(n_features: int, n_classes: int, dtype=jnp.float32) -> Params:
    """Initialises multinomial logistic regression at zero.

    Args:
      n_features: input dimension.
      n_classes: number of classes.
      dtype: floating dtype of the weights.

    Returns:
      One layer ``[{"W": zeros (n_features, n_classes), "b": zeros (n_classes,)}]``.
    """
    return [{"W": jnp.zeros((n_features, n_classes), dtype), "b": jnp.zeros(n_classes, dtype)}]


def softmax_regression_apply(params: Params, x: jax.Array) -> jax.Array:
    """Returns the logits ``x @ W + b`` of shape ``(N, n_classes)``."""
    return x @ params[0]["W"] + params[0]["b"]


def cnn_init(
    key: jax.Array,
    image_shape: tuple[int, int],
    n_classes: int,
    channels: Sequence[int] = (8, 16),
    dtype=jnp.float32,
) -> Params:
    """Initialises a small convolutional network for grayscale images.

    Each of the ``len(channels)`` blocks is a 3x3 'SAME' convolution, SiLU (x·sigmoid(x)) and
    2x2 average pooling (which halves each side, rounding down); a dense layer
    maps the flattened features to the logits. Weights are
    ``N(0, 1) / sqrt(fan_in)`` with ``fan_in = 9 * in_channels`` for a
    convolution, biases zero.

    Args:
      key: PRNG key.
      image_shape: ``(H, W)``; each side must stay >= 1 after the poolings.
      n_classes: number of outputs.
      channels: output channels of the convolutions.
      dtype: floating dtype of the weights.

    Returns:
      ``len(channels)`` conv layers ``{"W": (3, 3, c_in, c_out), "b": (c_out,)}``
      (HWIO) then one dense layer ``{"W": (features, n_classes), "b": ...}``.
    """
    h, w = (side // 2 ** len(channels) for side in image_shape)
    if h < 1 or w < 1:
        raise ValueError(f"image_shape {image_shape} is too small for {len(channels)} poolings")
    keys = jax.random.split(key, len(channels) + 1)
    c_in = (1, *channels[:-1])
    params = [
        _dense_init(k, 9 * ci, (3, 3, ci, co), dtype) for k, ci, co in zip(keys, c_in, channels)
    ]
    features = h * w * channels[-1]
    params.append(_dense_init(keys[-1], features, (features, n_classes), dtype))
    return params


def cnn_apply(
    params: Params, x: jax.Array, image_shape: tuple[int, int] | None = None
) -> jax.Array:
    """Applies the network of :func:`cnn_init`.

    Args:
      params: weights from :func:`cnn_init`.
      x: flattened images of shape ``(N, H * W)``.
      image_shape: ``(H, W)``; by default the images are taken to be square.

    Returns:
      Logits of shape ``(N, n_classes)``.
    """
    if image_shape is None:
        side = math.isqrt(x.shape[-1])
        if side * side != x.shape[-1]:
            raise ValueError(f"{x.shape[-1]} pixels is not a square image: pass image_shape")
        image_shape = (side, side)
    x = x.reshape(x.shape[0], *image_shape, 1)  # NHWC
    for layer in params[:-1]:
        dtype = jnp.result_type(x, layer["W"])  # promote as a matmul would
        x = conv_same(x.astype(dtype), layer["W"].astype(dtype))
        # SiLU and average pooling keep the model smooth. Relu's (and max pooling's) derivative
        # jumps, so a training step w - η∇L(w) jumps as an example's unit switches, and the
        # hypergradient of a long run (the derivative of its smooth pieces) misses those jumps:
        # through 600 Adam steps on digits it says lowering the learning rate helps while the
        # validation loss rises (docs/experiments.md, realtime).
        x = jax.nn.silu(x + layer["b"])
        n, h, w, c = x.shape
        x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    return x.reshape(x.shape[0], -1) @ params[-1]["W"] + params[-1]["b"]


def conv_same(x: jax.Array, w: jax.Array) -> jax.Array:
    """The 'SAME', stride-1 convolution of NHWC images by an HWIO kernel, as one matrix product over
    the images' patches.

    Not ``lax.conv_general_dilated``: XLA:CPU puts a convolution in the form its fast (Eigen)
    kernel takes only outside loops, and the convolutions of a gradient are not in that form, so
    inside ``lax.scan`` (every training run here) they run a naive loop: a training step
    2-30x slower (docs/sharp_bits.md, "Convolutions in a loop on CPU"). The derivatives of this
    product are products, pads and slices, as fast in a loop as outside.
    """
    kh, kw, c_in, c_out = w.shape
    n, h, wd, _ = x.shape
    padded = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))  # as XLA pads
    patches = jnp.concatenate([padded[:, i:i + h, j:j + wd] for i in range(kh) for j in range(kw)], axis=-1)
    return patches @ w.reshape(kh * kw * c_in, c_out)


def cross_entropy(logits: jax.Array, y: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy with integer labels.

    With per-example ``weights`` (hyperparameters in data hyper-cleaning) the
    loss is ``sum_i weights_i * l_i / N``: normalised by the number of
    examples ``N``, not by ``sum_i weights_i``, so that each weight's effect is
    its own and all-one weights give the plain mean.

    Args:
      logits: ``(N, n_classes)``.
      y: integer labels ``(N,)``.
      weights: optional per-example weights ``(N,)``.

    Returns:
      A scalar.
    """
    log_p = jax.nn.log_softmax(logits, axis=-1)
    losses = -jnp.take_along_axis(log_p, y[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if weights is None:
        return jnp.mean(losses)
    return jnp.sum(weights * losses) / losses.shape[0]


def accuracy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of examples whose largest logit is at the true label."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)


def error_rate(logits: jax.Array, y: jax.Array) -> jax.Array:
    """``1 - accuracy(logits, y)``."""
    return 1.0 - accuracy(logits, y)


def l2_penalty(params: Params, strengths) -> jax.Array:
    """Per-layer L2 penalty on the weight matrices (biases are not penalised).

    Args:
      params: a list of layers ``{"W": ..., "b": ...}``.
      strengths: one strength per layer (a list or a vector of length
        ``len(params)``), or a scalar shared by all layers.

    Returns:
      ``sum_l strengths[l] * ||W_l||^2`` (squared Frobenius norm).
    """
    strengths = jnp.asarray(strengths)
    if strengths.ndim > 1 or (strengths.ndim == 1 and strengths.shape[0] != len(params)):
        raise ValueError(
            f"need a scalar or one strength per layer ({len(params)}), got shape {strengths.shape}"
        )
    strengths = jnp.broadcast_to(strengths, (len(params),))
    return sum(s * jnp.sum(layer["W"] ** 2) for s, layer in zip(strengths, params))
