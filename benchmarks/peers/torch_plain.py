"""B1 in plain PyTorch: reverse mode through the unrolled loop with autograd.

``hypergrad`` keeps the whole training graph: each step takes
``torch.autograd.grad(loss, w, create_graph=True)`` so that the update
w_t = w_{t-1} - lr_t * v_t stays differentiable, and the hyperparameters are
leaf tensors with ``requires_grad``. Memory grows as O(T * d) plus the
minibatch activations of every step.
"""

from __future__ import annotations

import torch

from . import _torch as tu
from .common import HPARAM_KEYS, B1Problem

NAME = "torch_plain"


def train(problem: B1Problem) -> list:
    """Plain training: gradients of each step only, updates under no_grad."""
    data = tu.Data(problem)
    params = tu.initial_params(problem, requires_grad=True)
    log_l2 = torch.from_numpy(problem.log_l2)
    lr = torch.from_numpy(problem.lr)
    mu = torch.from_numpy(problem.momentum)
    vel = [torch.zeros_like(p) for p in params]
    for t in range(problem.T):
        x, y = data.batch(t)
        grads = torch.autograd.grad(tu.train_loss(params, log_l2, x, y), params)
        with torch.no_grad():
            for i, (p, v, g) in enumerate(zip(params, vel, grads)):
                l = i // 2
                v.mul_(mu[t, l]).add_((1 - mu[t, l]) * g)
                p.sub_(lr[t, l] * v)
    return tu.to_numpy_weights(params)


def hypergrad(problem: B1Problem):
    """Validation loss at w_T and its gradient w.r.t. log_l2, lr, momentum."""
    data = tu.Data(problem)
    hp = tu.hparam_leaves(problem)
    log_l2, lr, mu = hp["log_l2"], hp["lr"], hp["momentum"]
    params = tu.initial_params(problem, requires_grad=True)
    vel = [torch.zeros_like(p) for p in params]
    for t in range(problem.T):
        x, y = data.batch(t)
        grads = torch.autograd.grad(
            tu.train_loss(params, log_l2, x, y), params, create_graph=True
        )
        new_params, new_vel = [], []
        for i, (p, v, g) in enumerate(zip(params, vel, grads)):
            l = i // 2
            v = mu[t, l] * v + (1 - mu[t, l]) * g
            new_vel.append(v)
            new_params.append(p - lr[t, l] * v)
        params, vel = new_params, new_vel
    value = tu.val_loss(params, data)
    grads = torch.autograd.grad(value, [hp[k] for k in HPARAM_KEYS])
    return tu.as_float(value), tu.grads_to_numpy(HPARAM_KEYS, grads)
