"""The precision of float32 matrix products in the library's compiled programs, and the compute
dtype of a mixed-precision loss.

JAX's default lets a GPU multiply float32 matrices in TF32 (10-bit mantissas), and a TPU in
bfloat16; on a GPU that moved B1's hypergradient by 1%. The library's programs therefore run
their products at full precision, ``"highest"``, unless the user has chosen otherwise with JAX's
own setting, which then wins (for speed over accuracy):

    with jax.default_matmul_precision("tensorfloat32"):   # or "bfloat16", "default"
        res = hg.hypergrad(dyn, objective, lam)

    JAX_DEFAULT_MATMUL_PRECISION=tensorfloat32 python train.py

A product given its own ``precision=`` keeps it. On CPU float32 products are exact-precision
whatever the setting, so nothing changes there.

A mixed-precision loss casts its weights and inputs with :func:`to_compute` (bfloat16 by
default). ``hg.Reverse(adjoint_dtype=jnp.float32)`` traces a float32 copy of each step for its
backward pass, inside :func:`adjoint_precision`, where :func:`to_compute` casts to float32
instead; a loss that casts with ``.astype(jnp.bfloat16)`` keeps bfloat16 there too.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp


def matmul_precision() -> str:
    """The precision the library's programs use now: JAX's setting if one is made, else "highest"."""
    return jax.config.jax_default_matmul_precision or "highest"


def library_precision():
    """A context in which traced products take :func:`matmul_precision`."""
    return jax.default_matmul_precision(matmul_precision())


# ---------------------------------------------------------------- mixed precision

_ADJOINT_DTYPE: contextvars.ContextVar = contextvars.ContextVar("adjoint_dtype", default=None)


def compute_dtype(dtype=jnp.bfloat16):
    """The dtype a mixed-precision loss computes in: ``dtype``, except while
    ``hg.Reverse(adjoint_dtype=...)`` traces the copy of a step that its backward pass
    differentiates, where it is that adjoint dtype (float32: the copy is the same step in full
    precision, differentiated at the bfloat16 run's states)."""
    override = _ADJOINT_DTYPE.get()
    return jnp.dtype(dtype if override is None else override)


def to_compute(tree, dtype=jnp.bfloat16):
    """Every floating-point leaf of ``tree`` cast to :func:`compute_dtype` (``dtype``); other
    leaves (integer labels, keys) as they are. The first line of a mixed-precision loss:

        def loss(w, lam, batch):
            w, x = hg.precision.to_compute((w, batch[0]))        # bfloat16 compute
            logits = apply(w, x).astype(jnp.float32)             # reduce in float32
            ...
    """
    target = compute_dtype(dtype)
    return jax.tree.map(
        lambda a: a.astype(target) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree)


@contextlib.contextmanager
def adjoint_precision(dtype):
    """A context in which :func:`compute_dtype` answers ``dtype`` (what ``Reverse(adjoint_dtype=)``
    traces its backward steps in)."""
    token = _ADJOINT_DTYPE.set(jnp.dtype(dtype))
    try:
        yield
    finally:
        _ADJOINT_DTYPE.reset(token)
