"""The precision of float32 matrix products in the library's compiled programs.

JAX's default lets a GPU multiply float32 matrices in TF32 (10-bit mantissas), and a TPU in
bfloat16; on a GPU that moved B1's hypergradient by 1%. The library's programs therefore run
their products at full precision, ``"highest"``, unless the user has chosen otherwise with JAX's
own setting, which then wins (for speed over accuracy):

    with jax.default_matmul_precision("tensorfloat32"):   # or "bfloat16", "default"
        res = hg.hypergrad(dyn, objective, lam)

    JAX_DEFAULT_MATMUL_PRECISION=tensorfloat32 python train.py

A product given its own ``precision=`` keeps it. On CPU float32 products are exact-precision
whatever the setting, so nothing changes there.
"""

from __future__ import annotations

import jax


def matmul_precision() -> str:
    """The precision the library's programs use now: JAX's setting if one is made, else "highest"."""
    return jax.config.jax_default_matmul_precision or "highest"


def library_precision():
    """A context in which traced products take :func:`matmul_precision`."""
    return jax.default_matmul_precision(matmul_precision())
