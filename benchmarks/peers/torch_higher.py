"""B1 with ``higher``: ``innerloop_ctx`` and its differentiable SGD.

One parameter group per layer, so per-layer values work; the per-step
values go in through ``diffopt.step(..., override=...)`` as tensors that
require grad.

Mapping the spec onto higher's SGD. higher's ``DifferentiableSGD`` copies
``torch.optim.SGD`` (heavy ball with dampening):

    first step:  buf = g                                  (no dampening)
    later:       buf = momentum * buf + (1 - dampening) * g
    w = w - lr * buf

The spec is v_t = mu_t v_{t-1} + (1 - mu_t) g_t with v_0 = 0, so
v_1 = (1 - mu_1) g_1. Overriding ``dampening`` = ``momentum`` = mu_t at
every step gives the spec from step 2 on. The first step is the exception:
higher stores the raw g_1 as the buffer, and a scaled lr would fix w_1 but
not the buffer carried into step 2. So on the first step a ``grad_callback``
multiplies each layer's gradient by (1 - mu_1[l]) before the optimizer sees
it; then buf = (1 - mu_1) g_1 = v_1 exactly. ``check_agreement.py`` verifies
the result against ``torch_plain`` and finite differences.

The L2 term is part of the training loss, as in the spec, rather than
higher's ``weight_decay`` (which would also decay the biases of a group).
"""

from __future__ import annotations

import higher
import torch
from torch import nn

from . import _torch as tu
from .common import HPARAM_KEYS, B1Problem

NAME = "torch_higher"


class MLP(nn.Module):
    """Parameters registered in the flat order W0, b0, W1, b1, ..."""

    def __init__(self, problem: B1Problem):
        super().__init__()
        self.n_layers = problem.n_layers
        for i, p in enumerate(tu.initial_params(problem)):
            name = f"W{i // 2}" if i % 2 == 0 else f"b{i // 2}"
            setattr(self, name, nn.Parameter(p))

    def flat(self):
        return [getattr(self, f"{k}{l}") for l in range(self.n_layers) for k in "Wb"]

    def forward(self, x):
        return tu.forward(self.flat(), x)


def _setup(problem: B1Problem):
    model = MLP(problem)
    groups = [
        {"params": [getattr(model, f"W{l}"), getattr(model, f"b{l}")]}
        for l in range(problem.n_layers)
    ]
    # Placeholder values; every step overrides lr, momentum and dampening.
    opt = torch.optim.SGD(groups, lr=float(problem.lr[0, 0]),
                          momentum=float(problem.momentum[0, 0]),
                          dampening=float(problem.momentum[0, 0]))
    return model, opt


def _first_step_scaling(mu0):
    """grad_callback for step 1: g -> (1 - mu_1[l]) g, so that buf_1 = v_1."""
    def callback(grads):
        return [g * (1 - mu0[i // 2]) for i, g in enumerate(grads)]
    return callback


def _unroll(problem, data, fmodel, diffopt, log_l2, lr, mu):
    L = problem.n_layers
    for t in range(problem.T):
        x, y = data.batch(t)
        loss = tu.train_loss(fmodel.flat(), log_l2, x, y)
        override = {
            "lr": [lr[t, l] for l in range(L)],
            "momentum": [mu[t, l] for l in range(L)],
            "dampening": [mu[t, l] for l in range(L)],
        }
        diffopt.step(
            loss,
            override=override,
            grad_callback=_first_step_scaling(mu[0]) if t == 0 else None,
        )


def train(problem: B1Problem) -> list:
    """higher with ``track_higher_grads=False``: no graph across steps."""
    data = tu.Data(problem)
    model, opt = _setup(problem)
    log_l2 = torch.from_numpy(problem.log_l2)
    lr = torch.from_numpy(problem.lr)
    mu = torch.from_numpy(problem.momentum)
    with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        _unroll(problem, data, fmodel, diffopt, log_l2, lr, mu)
        return tu.to_numpy_weights(fmodel.flat())


def hypergrad(problem: B1Problem):
    """Validation loss at w_T and its gradient w.r.t. log_l2, lr, momentum."""
    data = tu.Data(problem)
    model, opt = _setup(problem)
    hp = tu.hparam_leaves(problem)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        _unroll(problem, data, fmodel, diffopt, hp["log_l2"], hp["lr"], hp["momentum"])
        value = tu.val_loss(fmodel.flat(), data)
        grads = torch.autograd.grad(value, [hp[k] for k in HPARAM_KEYS])
    return tu.as_float(value), tu.grads_to_numpy(HPARAM_KEYS, grads)
