"""A small zoo of training runs shared by the tests, plus float64 finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import hypergradient as hg


def central_difference(f, lam, direction, eps=1e-6):
    """(f(λ + εv) − f(λ − εv)) / 2ε, with ε scaled to λ."""
    scale = max(1.0, max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(lam)))
    h = eps * scale
    plus = jax.tree.map(lambda x, v: x + h * v, lam, direction)
    minus = jax.tree.map(lambda x, v: x - h * v, lam, direction)
    return (float(f(plus)) - float(f(minus))) / (2 * h)


def random_direction(lam, seed=0):
    leaves, treedef = jax.tree.flatten(lam)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(x), jnp.float64) for k, x in zip(keys, leaves)])


def tree_dot(a, b):
    return float(sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def outer_value(dyn, objective):
    """λ -> f(λ) through plain training (the function every method differentiates)."""
    return lambda lam: objective(dyn.run(lam), lam)


# -- ridge regression trained by full-batch gradient descent ---------------------

def ridge_data(n=30, nv=20, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w_true = rng.normal(size=d)
    y = x @ w_true + 0.5 * rng.normal(size=n)
    xv = rng.normal(size=(nv, d))
    yv = xv @ w_true + 0.5 * rng.normal(size=nv)
    return x, y, xv, yv


def ridge_problem(steps=25, optimizer=None):
    """L(w) = ||Xw − y||²/n + exp(λ_l2)·||w||², GD with learning rate λ_lr from w_0 = 0."""
    x, y, xv, yv = ridge_data()

    def loss(w, lam, batch):
        bx, by = batch
        return jnp.mean((bx @ w - by) ** 2) + jnp.exp(lam["log_l2"]) * jnp.sum(w**2)

    dyn = hg.Dynamics(
        init=jnp.zeros(x.shape[1]),
        loss=loss,
        optimizer=optimizer or hg.optim.sgd(),
        optimizer_hparams=lambda lam, t: {"lr": lam["lr"]},
        data=(jnp.asarray(x), jnp.asarray(y)),
        steps=steps,
    )

    def objective(w, lam):
        return jnp.mean((xv @ w - yv) ** 2)

    lam = {"log_l2": jnp.asarray(-1.0), "lr": jnp.asarray(0.1)}
    return dyn, objective, lam


def ridge_closed_form(lam, steps):
    """f(λ) and ∇f(λ) of the ridge problem, from the eigendecomposition of the Hessian.

    With H = 2(XᵀX/n + c I), b = 2Xᵀy/n, c = exp(λ_l2), w* = H⁻¹b, gradient descent
    from 0 gives w_T = w* − (I − ηH)ᵀ w*, i.e. in the eigenbasis of XᵀX:
    w_T = Q diag((1 − (1 − η h_i)^T) / h_i) Qᵀ b.
    """
    x, y, xv, yv = ridge_data()
    n = x.shape[0]
    c, eta = np.exp(float(lam["log_l2"])), float(lam["lr"])
    s, q = np.linalg.eigh(x.T @ x / n)
    h = 2 * (s + c)
    bq = q.T @ (2 * x.T @ y / n)
    decay = (1 - eta * h) ** steps
    coef = (1 - decay) / h
    w = q @ (coef * bq)
    r = xv @ w - yv
    dE_dw = 2 * xv.T @ r / xv.shape[0]
    # d coef / d h and d coef / d eta, elementwise
    dcoef_dh = (steps * (1 - eta * h) ** (steps - 1) * eta) / h - (1 - decay) / h**2
    dcoef_deta = steps * (1 - eta * h) ** (steps - 1)
    dw_dlogl2 = q @ (dcoef_dh * 2 * c * bq)
    dw_deta = q @ (dcoef_deta * bq)
    return float(r @ r / len(r)), {"log_l2": dE_dw @ dw_dlogl2, "lr": dE_dw @ dw_deta}


# -- a small tanh MLP with every kind of hyperparameter --------------------------

def mlp_problem(steps=12, optimizer=None, hparams=None, batch_size=10, seed=0):
    """A 5-6-3 tanh MLP on 40 random examples, trained with minibatches.

    Hyperparameters: per-step, per-layer learning rates and momenta, per-layer
    log-L2 strengths, a log init scale per layer and per-example weights.
    ``hparams(lam, t)`` may replace the optimizer's hyperparameter map.
    """
    rng = np.random.default_rng(seed)
    n, nv, sizes = 40, 30, (5, 6, 3)
    x = rng.normal(size=(n, sizes[0]))
    y = rng.integers(0, sizes[-1], n)
    xv = rng.normal(size=(nv, sizes[0]))
    yv = rng.integers(0, sizes[-1], nv)
    base = [
        {"W": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a)), "b": jnp.asarray(0.1 * rng.normal(size=b))}
        for a, b in zip(sizes[:-1], sizes[1:])
    ]
    layers = len(base)

    def apply(w, x):
        for layer in w[:-1]:
            x = jnp.tanh(x @ layer["W"] + layer["b"])
        return x @ w[-1]["W"] + w[-1]["b"]

    def ce(logits, y):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]

    def init(lam):
        return [{"W": jnp.exp(s) * p["W"], "b": p["b"]} for s, p in zip(lam["log_scale"], base)]

    def loss(w, lam, batch):
        bx, by, idx = batch
        weights = jax.nn.sigmoid(lam["example_logit"][idx])
        l2 = sum(jnp.exp(c) * jnp.sum(p["W"] ** 2) for c, p in zip(lam["log_l2"], w))
        return jnp.mean(weights * ce(apply(w, bx), by)) + l2

    def default_hparams(lam, t):
        return {"lr": list(lam["lr"][t]), "momentum": list(lam["momentum"][t])}

    dyn = hg.Dynamics(
        init=init,
        loss=loss,
        optimizer=optimizer or hg.optim.momentum(dampen=True),
        optimizer_hparams=hparams or default_hparams,
        data=hg.Batches((jnp.asarray(x), jnp.asarray(y), jnp.arange(n)), batch_size, key=jax.random.PRNGKey(seed)),
        steps=steps,
    )

    def objective(w, lam):
        return jnp.mean(ce(apply(w, jnp.asarray(xv)), jnp.asarray(yv)))

    lam = {
        "lr": jnp.full((steps, layers), 0.3) + 0.05 * jnp.asarray(rng.normal(size=(steps, layers))),
        "momentum": jnp.full((steps, layers), 0.8) + 0.05 * jnp.asarray(rng.normal(size=(steps, layers))),
        "log_l2": jnp.full(layers, -3.0),
        "log_scale": jnp.zeros(layers),
        "example_logit": jnp.asarray(rng.normal(size=n)),
    }
    return dyn, objective, lam


def eqx_classifier():
    """A small Equinox MLP (4 → 5 → 5 → 3, tanh), its training and validation data (24 and 16
    points of 3 classes) and the cross-entropy ``ce(model, x, y)``."""
    import equinox as eqx

    model = eqx.nn.MLP(4, 3, width_size=5, depth=2, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    train = jnp.asarray(rng.normal(size=(24, 4))), jnp.asarray(rng.integers(0, 3, 24))
    val = jnp.asarray(rng.normal(size=(16, 4))), jnp.asarray(rng.integers(0, 3, 16))

    def ce(m, x, y):
        logits = jax.vmap(m)(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    return model, train, val, ce
