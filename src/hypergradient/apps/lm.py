"""The language-model tuning problem: the transformer of :mod:`.transformer` trained by AdamW on
byte windows from several sources (:mod:`.text`), as ``(dyn, objective, λ)``.

λ (all unconstrained)::

    log_peak        lr_t = warmup_cosine(t, exp(log_peak), warmup, T)
    log_wd          AdamW's decoupled weight decay exp(log_wd)
    source_logits   window i's weight in the training loss, S · softmax(source_logits)[source_i]

(S sources: equal logits weight every window 1; a λ without ``source_logits`` weights every window
1 too). The objective is the validation windows' mean
next-token cross-entropy in nats per byte, unweighted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypergradient as hg
from hypergradient.apps import transformer


def _train_loss(w, lam, batch, heads):
    tokens, source = batch
    if "source_logits" not in lam:
        return transformer.lm_loss(w, tokens, heads=heads)
    logits = lam["source_logits"]
    weights = logits.shape[0] * jax.nn.softmax(logits)[source]
    return transformer.lm_loss(w, tokens, weights, heads)


def _val_loss(tokens, heads, w, lam):
    return transformer.lm_loss(w, tokens, heads=heads)


def _chunk_loss(heads, w, lam, tokens):
    return transformer.lm_loss(w, tokens, heads=heads)


def _schedule(steps, warmup, lam, t):
    return {"learning_rate": hg.optim.warmup_cosine(t, jnp.exp(lam["log_peak"]), warmup, steps),
            "weight_decay": jnp.exp(lam["log_wd"])}


def make_dynamics(train, steps: int, batch_size: int = 16, d_model: int = 64, heads: int = 4, layers: int = 2,
                  peak: float = 3e-3, weight_decay: float = 1e-2, warmup: float | None = None, dtype=jnp.float32):
    """``seed -> hg.Dynamics``: AdamW on the training windows ``train`` (``(tokens (N, L + 1),
    source (N,))``) from the weights of ``PRNGKey(seed)`` in the minibatch order of
    ``PRNGKey(seed + 1)``. The functions are built once, here, so every seed's run reuses one
    compiled program. ``warmup`` (default ``steps / 10``) is fixed."""
    tokens, source = jnp.asarray(train[0]), jnp.asarray(train[1])
    context = tokens.shape[1] - 1
    loss = jax.tree_util.Partial(_train_loss, heads=heads)
    optimizer = hg.optim.from_optax(optax.adamw, learning_rate=peak, weight_decay=weight_decay)
    schedule = functools.partial(_schedule, steps, steps / 10 if warmup is None else warmup)

    def dynamics(seed: int) -> hg.Dynamics:
        w0 = transformer.transformer_init(jax.random.PRNGKey(seed), 256, d_model, heads, layers, context, dtype)
        return hg.Dynamics(init=w0, loss=loss, optimizer=optimizer, optimizer_hparams=schedule,
                           data=hg.Batches((tokens, source), batch_size, key=jax.random.PRNGKey(seed + 1)),
                           steps=steps)

    return dynamics


def objective(val_tokens, heads: int = 4, val_chunk: int | None = None):
    """``(w, λ) ->`` the mean next-token cross-entropy of the validation windows; with
    ``val_chunk``, taken that many windows at a time (``hg.chunked``)."""
    if val_chunk is None:
        return jax.tree_util.Partial(_val_loss, jnp.asarray(val_tokens), heads)
    return hg.chunked(jax.tree_util.Partial(_chunk_loss, heads), jnp.asarray(val_tokens), val_chunk)


def default_lam(n_sources: int, peak: float = 3e-3, weight_decay: float = 1e-2, dtype=jnp.float32) -> dict:
    """λ at ``peak``, ``weight_decay`` and equal source weights (no ``source_logits`` when ``n_sources`` is 0)."""
    lam = {"log_peak": jnp.asarray(np.log(peak), dtype), "log_wd": jnp.asarray(np.log(weight_decay), dtype)}
    if n_sources:
        lam["source_logits"] = jnp.zeros(n_sources, dtype)
    return lam


def source_weights(lam) -> np.ndarray:
    """Each source's weight in the training loss, ``S · softmax(source_logits)`` (mean 1)."""
    logits = np.asarray(lam["source_logits"], np.float64)
    p = np.exp(logits - logits.max())
    return len(logits) * p / p.sum()


def byte_scores(params, windows, heads: int = 4):
    """Mean next-token cross-entropy (nats per byte) and error rate of the most likely next byte
    over ``windows (N, L + 1)``."""
    logits = transformer.transformer_apply(params, windows[:, :-1], heads)
    targets = windows[:, 1:].astype(jnp.int32)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.mean(jnp.take_along_axis(log_p, targets[..., None], axis=-1))
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) != targets)


def problem(train, val, n_sources: int, steps: int, batch_size: int = 16, d_model: int = 64, heads: int = 4,
            layers: int = 2, peak: float = 3e-3, weight_decay: float = 1e-2, warmup: float | None = None,
            val_chunk: int | None = None, seed: int = 0, dtype=jnp.float32):
    """``(dyn, objective, λ)`` from ``train``/``val`` windows ``(tokens (N, L + 1), source (N,))``.

    The context is ``L``; the defaults of λ are ``peak``, ``weight_decay`` and equal source
    weights; ``warmup`` (default ``steps / 10``) is fixed. With ``val_chunk``, the objective
    takes the validation windows that many at a time (``hg.chunked``: its gradient's memory is
    one chunk's).
    """
    dyn = make_dynamics(train, steps, batch_size, d_model, heads, layers, peak, weight_decay, warmup, dtype)(seed)
    return dyn, objective(val[0], heads, val_chunk), default_lam(n_sources, peak, weight_decay, dtype)
