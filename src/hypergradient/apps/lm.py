"""The language-model tuning problem: the transformer of :mod:`.transformer` trained by AdamW on
byte windows from several sources (:mod:`.text`), as ``(dyn, objective, λ)``.

λ (all unconstrained)::

    log_peak        lr_t = warmup_cosine(t, exp(log_peak), warmup, T)
    log_wd          AdamW's decoupled weight decay exp(log_wd)
    source_logits   window i's weight in the training loss, S · softmax(source_logits)[source_i]

(S sources: equal logits weight every window 1). The objective is the validation windows' mean
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


def problem(train, val, n_sources: int, steps: int, batch_size: int = 16, d_model: int = 64, heads: int = 4,
            layers: int = 2, peak: float = 3e-3, weight_decay: float = 1e-2, warmup: float | None = None,
            val_chunk: int | None = None, seed: int = 0, dtype=jnp.float32):
    """``(dyn, objective, λ)`` from ``train``/``val`` windows ``(tokens (N, L + 1), source (N,))``.

    The context is ``L``; the defaults of λ are ``peak``, ``weight_decay`` and equal source
    weights; ``warmup`` (default ``steps / 10``) is fixed. With ``val_chunk``, the objective
    takes the validation windows that many at a time (``hg.chunked``: its gradient's memory is
    one chunk's).
    """
    tokens, source = train
    context = tokens.shape[1] - 1
    w0 = transformer.transformer_init(jax.random.PRNGKey(seed), 256, d_model, heads, layers, context, dtype)
    warmup = steps / 10 if warmup is None else warmup
    dyn = hg.Dynamics(
        init=w0,
        loss=jax.tree_util.Partial(_train_loss, heads=heads),
        optimizer=hg.optim.from_optax(optax.adamw, learning_rate=peak, weight_decay=weight_decay),
        optimizer_hparams=functools.partial(_schedule, steps, warmup),
        data=hg.Batches((jnp.asarray(tokens), jnp.asarray(source)), batch_size, key=jax.random.PRNGKey(seed + 1)),
        steps=steps)
    if val_chunk is None:
        objective = jax.tree_util.Partial(_val_loss, jnp.asarray(val[0]), heads)
    else:
        objective = hg.chunked(jax.tree_util.Partial(_chunk_loss, heads), jnp.asarray(val[0]), val_chunk)
    lam = {"log_peak": jnp.asarray(np.log(peak), dtype), "log_wd": jnp.asarray(np.log(weight_decay), dtype),
           "source_logits": jnp.zeros(n_sources, dtype)}
    return dyn, objective, lam
