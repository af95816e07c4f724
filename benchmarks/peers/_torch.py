"""Pieces the three PyTorch peers share: tensors from a problem, the model, the loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .common import B1Problem, batch_rows


class Data:
    """The problem's arrays as tensors (views of the numpy arrays, no copies)."""

    def __init__(self, problem: B1Problem):
        self.problem = problem
        self.x_train = torch.from_numpy(problem.x_train)
        self.y_train = torch.from_numpy(problem.y_train)
        self.x_val = torch.from_numpy(problem.x_val)
        self.y_val = torch.from_numpy(problem.y_val)
        self.n = problem.x_train.shape[0]

    def batch(self, t: int):
        rows = batch_rows(t, self.problem.batch_size, self.n)
        if not isinstance(rows, slice):
            rows = torch.from_numpy(rows)
        return self.x_train[rows], self.y_train[rows]


def initial_params(problem: B1Problem, requires_grad: bool = False) -> list:
    """Fresh copies of the initial weights, flat: [W0, b0, W1, b1, ...]."""
    return [
        torch.tensor(a, requires_grad=requires_grad)
        for W, b in problem.weights
        for a in (W, b)
    ]


def hparam_leaves(problem: B1Problem) -> dict:
    """The hyperparameters as fresh leaf tensors that require grad."""
    return {k: torch.tensor(v, requires_grad=True) for k, v in problem.hparams().items()}


def forward(params, x):
    """MLP logits; ``params`` is flat [W0, b0, W1, b1, ...], W of shape (fan_in, fan_out)."""
    n_layers = len(params) // 2
    h = x
    for l in range(n_layers):
        h = torch.addmm(params[2 * l + 1], h, params[2 * l])
        if l < n_layers - 1:
            h = torch.tanh(h)
    return h


def l2_penalty(log_l2, params):
    """sum_l exp(log_l2[l]) * ||W_l||^2, weights only."""
    weights = params[0::2]
    return sum(torch.exp(log_l2[l]) * (W * W).sum() for l, W in enumerate(weights))


def train_loss(params, log_l2, x, y):
    return F.cross_entropy(forward(params, x), y) + l2_penalty(log_l2, params)


def val_loss(params, data: Data):
    return F.cross_entropy(forward(params, data.x_val), data.y_val)


def to_numpy_weights(params) -> list:
    """Flat tensors -> list of (W, b) numpy pairs."""
    arrs = [p.detach().numpy().copy() for p in params]
    return list(zip(arrs[0::2], arrs[1::2]))


def grads_to_numpy(keys, grads) -> dict:
    return {k: g.detach().numpy().copy() for k, g in zip(keys, grads)}


def as_float(x) -> float:
    return float(np.asarray(x.detach()))
