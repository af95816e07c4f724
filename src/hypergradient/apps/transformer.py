"""A small decoder-only transformer language model as a pure function of a weight pytree.

Pre-LayerNorm blocks, each ``h + Attn(LN(h))`` then ``h + MLP(LN(h))`` with a GELU (tanh form)
MLP of width ``4·d_model``, learned token and position embeddings, a final LayerNorm and an untied
output layer. Byte-level by default (256 tokens).

The attention (:func:`causal_attention`) is ``jax.nn.dot_product_attention(..., is_causal=True,
implementation="xla")``: XLA's implementation is ordinary JAX operations (products, a masked
softmax), so it is differentiable to any order, which a hypergradient needs (each backward step
of ``hg.Reverse`` differentiates a gradient: a Hessian-vector product through the attention;
forward-over-reverse takes a ``jvp`` of it). The cuDNN implementation is a fused GPU kernel with
a hand-written first derivative and no second one, so it cannot be used inside a hypergradient.
XLA's implementation always takes its softmax in float32, so float64 weights get the same maths
written out in float64 instead (what the finite-difference tests need).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _dense(key, n_in, n_out, dtype):
    return {"W": jax.random.normal(key, (n_in, n_out), dtype) / math.sqrt(n_in), "b": jnp.zeros(n_out, dtype)}


def _norm(d, dtype):
    return {"scale": jnp.ones(d, dtype), "bias": jnp.zeros(d, dtype)}


def transformer_init(key: jax.Array, vocab: int = 256, d_model: int = 64, heads: int = 4, layers: int = 2,
                     context: int = 64, dtype=jnp.float32) -> dict:
    """Initialises the model: dense weights ``N(0, 1) / sqrt(fan_in)``, embeddings ``N(0, 1) / sqrt(d_model)``,
    biases zero, LayerNorm scales one.

    Returns:
      ``{"embed": (vocab, d), "pos": (context, d), "blocks": [...], "norm": ..., "head": {"W": (d, vocab), "b"}}``,
      each block ``{"norm1", "qkv": (d, 3d), "proj": (d, d), "norm2", "fc": (d, 4d), "out": (4d, d)}``.
    """
    if d_model % heads:
        raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
    k_embed, k_pos, k_head, *k_blocks = jax.random.split(key, 3 + layers)
    blocks = []
    for k in k_blocks:
        k1, k2, k3, k4 = jax.random.split(k, 4)
        blocks.append({"norm1": _norm(d_model, dtype), "qkv": _dense(k1, d_model, 3 * d_model, dtype),
                       "proj": _dense(k2, d_model, d_model, dtype), "norm2": _norm(d_model, dtype),
                       "fc": _dense(k3, d_model, 4 * d_model, dtype), "out": _dense(k4, 4 * d_model, d_model, dtype)})
    scale = 1 / math.sqrt(d_model)
    return {"embed": scale * jax.random.normal(k_embed, (vocab, d_model), dtype),
            "pos": scale * jax.random.normal(k_pos, (context, d_model), dtype),
            "blocks": blocks, "norm": _norm(d_model, dtype), "head": _dense(k_head, d_model, vocab, dtype)}


def _layer_norm(p, x, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q kᵀ / sqrt(h) + causal mask) v per head, for ``(B, L, heads, h)`` arrays."""
    if q.dtype != jnp.float64:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    length = q.shape[1]
    scores = jnp.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(q.shape[-1])
    scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores, -jnp.inf)
    return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(scores, axis=-1), v)


def transformer_apply(params: dict, tokens: jax.Array, heads: int = 4) -> jax.Array:
    """Logits ``(B, L, vocab)`` of the next token at each position of ``tokens`` ``(B, L)``,
    ``L <= context``; position i sees tokens 0..i only."""
    b, length = tokens.shape
    h = params["embed"][tokens] + params["pos"][:length]
    d = h.shape[-1]
    for blk in params["blocks"]:
        x = _layer_norm(blk["norm1"], h)
        q, k, v = jnp.split(x @ blk["qkv"]["W"] + blk["qkv"]["b"], 3, axis=-1)
        q, k, v = (z.reshape(b, length, heads, d // heads) for z in (q, k, v))
        a = causal_attention(q, k, v)
        h = h + a.reshape(b, length, d) @ blk["proj"]["W"] + blk["proj"]["b"]
        x = _layer_norm(blk["norm2"], h)
        x = jax.nn.gelu(x @ blk["fc"]["W"] + blk["fc"]["b"], approximate=True)
        h = h + x @ blk["out"]["W"] + blk["out"]["b"]
    h = _layer_norm(params["norm"], h)
    return h @ params["head"]["W"] + params["head"]["b"]


def lm_losses(params: dict, windows: jax.Array, heads: int = 4) -> jax.Array:
    """Each window's mean next-token cross-entropy (nats per token), ``(B,)``: the model reads
    ``windows[:, :-1]`` and predicts ``windows[:, 1:]``."""
    logits = transformer_apply(params, windows[:, :-1], heads)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    targets = windows[:, 1:].astype(jnp.int32)
    return -jnp.mean(jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0], axis=-1)


def lm_loss(params: dict, windows: jax.Array, weights: jax.Array | None = None, heads: int = 4) -> jax.Array:
    """Mean next-token cross-entropy over windows ``(B, L + 1)``; with per-window ``weights``,
    ``sum_i weights_i · l_i / B`` (all-one weights: the plain mean)."""
    losses = lm_losses(params, windows, heads)
    return jnp.mean(losses) if weights is None else jnp.sum(weights * losses) / losses.shape[0]


def weight_matrices(params: dict) -> list:
    """The dense kernels (``W`` of every dense layer), those that weight decay usually shrinks."""
    return [blk[name]["W"] for blk in params["blocks"] for name in ("qkv", "proj", "fc", "out")] + [params["head"]["W"]]
