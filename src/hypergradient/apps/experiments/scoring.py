"""Scores of trained weights, in numpy (nothing to compile): cross-entropy and error rate."""

from __future__ import annotations

import jax
import numpy as np


def np_tree(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def metrics(logits: np.ndarray, y: np.ndarray) -> dict:
    """Mean cross-entropy and error rate of ``logits`` against integer labels ``y``."""
    logits = np.asarray(logits, np.float64)
    loss = -log_softmax(logits)[np.arange(len(y)), y].mean()
    error = float(np.mean(np.argmax(logits, axis=-1) != y))
    return {"loss": float(loss), "error": error}


def mlp_logits(params, x: np.ndarray) -> np.ndarray:
    """``models.mlp_apply`` (tanh MLP) in float64 numpy."""
    params = np_tree(params)
    h = np.asarray(x, np.float64)
    for layer in params[:-1]:
        h = np.tanh(h @ layer["W"] + layer["b"])
    return h @ params[-1]["W"] + params[-1]["b"]


def linear_logits(params, x: np.ndarray) -> np.ndarray:
    """``models.softmax_regression_apply`` in float64 numpy."""
    params = np_tree(params)
    return np.asarray(x, np.float64) @ params[0]["W"] + params[0]["b"]
