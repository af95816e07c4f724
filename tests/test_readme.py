"""The README's examples run as written: the tuned validation loss improves, the vmap example
gives one hypergradient per λ, and the optax chain under a warmup-cosine schedule trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergradient as hg
from pages import run_page


@pytest.mark.slow
def test_readme_examples_run_and_improve():
    scope = run_page("README.md", 3)
    assert float(scope["tuned"].best_value) < float(scope["res"].value)
    sols = scope["sols"]
    assert sols.value.shape == (3,) and sols.grad["log_l2"].shape == (3, 2) and not sols.diverged.any()
    dyn = scope["dyn"].replace(optimizer=scope["optimizer"], optimizer_hparams=scope["optimizer_hparams"], steps=20)
    lam = {"log_l2": jnp.full(2, -6.0), "log_peak": jnp.log(0.01), "warmup": jnp.asarray(5.5),
           "log_wd": jnp.asarray(-9.0)}
    res = hg.hypergrad(dyn, scope["objective"], lam)
    assert res.value < scope["objective"](scope["w0"], lam)
    assert all(np.all(np.isfinite(g)) and np.all(np.asarray(g) != 0) for g in jax.tree.leaves(res.grad))
