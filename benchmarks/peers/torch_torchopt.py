"""B1 with torchopt's functional API: a chained GradientTransformation and FuncOptimizer.

The update is ``torchopt.chain`` of

- ``dampened_trace(momentum)``: v = mu[t, l] v + (1 - mu[t, l]) g, a
  GradientTransformation of our own (below), and
- per layer l, ``torchopt.transform.masked(scale_by_schedule(c -> -lr[c, l]),
  mask of layer l)``: torchopt's own step-size schedule, indexing the (T, L)
  lr tensor with torchopt's step counter, so gradients reach lr[t, l];

applied with ``torchopt.FuncOptimizer(..., inplace=False)``, which takes the
gradient with ``create_graph=True`` and returns new parameter tensors.

Why not ``torchopt.sgd(lr, momentum, dampening)``: its trace
(``torchopt/transform/trace.py``) is heavy ball, and (1) the momentum is a
number fixed when the optimizer is built, so it cannot vary per step (nor
per layer, since one ``sgd`` covers the whole tree), and a new optimizer per
step would lose the state; (2) the first update stores the raw gradient
(``t.add_(g)``, no dampening), while the spec has v_1 = (1 - mu_1) g_1;
(3) which update is "first" is a flag in the closure (``first_call``), so an
optimizer object reused for a second run skips that special case. With a
constant mu and no first-step issue, heavy ball would map to the spec via
dampening = mu; the per-step table rules it out, hence the small custom
transform. ``check_agreement.py`` verifies the result against
``torch_plain`` and finite differences.

torchopt's C++ ops (``torchopt.accelerated_op``) do not load against torch
2.13 (undefined symbol in ``torchopt/_C``); they only serve Adam, so nothing
here uses them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torchopt

from . import _torch as tu
from .common import HPARAM_KEYS, B1Problem

NAME = "torch_torchopt"


class DampenedTraceState(NamedTuple):
    trace: tuple
    count: int


def dampened_trace(momentum: torch.Tensor) -> torchopt.base.GradientTransformation:
    """v_t = mu[t, l] v_{t-1} + (1 - mu[t, l]) g_t with v_0 = 0, for flat [W0, b0, W1, ...].

    ``momentum`` is a (T, L) tensor; parameter i belongs to layer i // 2.
    """

    def init_fn(params):
        return DampenedTraceState(tuple(torch.zeros_like(p) for p in params), 0)

    def update_fn(updates, state, *, params=None, inplace=True):
        t = state.count
        mu = momentum[t]
        if inplace:
            # Trace in place; the updates get a copy, since later transforms
            # (scale_by_schedule) scale them in place too.
            trace = tuple(
                v.mul_(mu[i // 2]).add_((1 - mu[i // 2]) * g)
                for i, (v, g) in enumerate(zip(state.trace, updates))
            )
            updates = tuple(g.copy_(v) for g, v in zip(updates, trace))
        else:
            trace = tuple(
                mu[i // 2] * v + (1 - mu[i // 2]) * g
                for i, (v, g) in enumerate(zip(state.trace, updates))
            )
            updates = trace
        return updates, DampenedTraceState(trace, t + 1)

    return torchopt.base.GradientTransformation(init_fn, update_fn)


def b1_optimizer(lr: torch.Tensor, momentum: torch.Tensor, n_layers: int):
    """The spec's per-step, per-layer momentum SGD as one torchopt transformation."""

    def layer_scale(l):
        mask = tuple(i // 2 == l for i in range(2 * n_layers))
        schedule = torchopt.transform.scale_by_schedule(lambda count: -lr[count, l])
        return torchopt.transform.masked(schedule, mask)

    return torchopt.chain(
        dampened_trace(momentum), *[layer_scale(l) for l in range(n_layers)]
    )


def train(problem: B1Problem) -> list:
    """The same transformation, in place, with first-order gradients only."""
    data = tu.Data(problem)
    params = tuple(tu.initial_params(problem, requires_grad=True))
    log_l2 = torch.from_numpy(problem.log_l2)
    impl = b1_optimizer(
        torch.from_numpy(problem.lr), torch.from_numpy(problem.momentum), problem.n_layers
    )
    state = impl.init(params)
    for t in range(problem.T):
        x, y = data.batch(t)
        grads = torch.autograd.grad(tu.train_loss(params, log_l2, x, y), params)
        with torch.no_grad():
            updates, state = impl.update(grads, state, params=params, inplace=True)
            torchopt.apply_updates(params, updates, inplace=True)
    return tu.to_numpy_weights(params)


def hypergrad(problem: B1Problem):
    """Validation loss at w_T and its gradient w.r.t. log_l2, lr, momentum."""
    data = tu.Data(problem)
    hp = tu.hparam_leaves(problem)
    params = tuple(tu.initial_params(problem, requires_grad=True))
    optimizer = torchopt.FuncOptimizer(
        b1_optimizer(hp["lr"], hp["momentum"], problem.n_layers), inplace=False
    )
    for t in range(problem.T):
        x, y = data.batch(t)
        params = optimizer.step(tu.train_loss(params, hp["log_l2"], x, y), params)
    value = tu.val_loss(params, data)
    grads = torch.autograd.grad(value, [hp[k] for k in HPARAM_KEYS])
    return tu.as_float(value), tu.grads_to_numpy(HPARAM_KEYS, grads)
