"""The guides run as written: "Bring your own training loop" (an Equinox model with BatchNorm and
dropout, a Flax NNX module, and an optax optimizer, each giving a finite hypergradient) and the
data-attribution page."""

import jax
import numpy as np
import pytest

from pages import run_page

pytestmark = pytest.mark.end_to_end  # left to `make test` by the floor leg (Makefile)


@pytest.mark.filterwarnings("ignore:When `eqx.nn.BatchNorm")
def test_own_loop_guide_runs():
    def finite_hypergradient(scope):
        res = scope["res"]
        assert np.isfinite(float(res.value))
        assert all(np.isfinite(np.asarray(g)).all() and np.any(np.asarray(g) != 0) for g in jax.tree.leaves(res.grad))

    scope = run_page("docs/own_loop.md", 3, finite_hypergradient)
    assert isinstance(scope["trained"], scope["Mlp"])
    assert set(scope["res"].grad) == {"log_peak", "warmup", "log_wd"}


def test_attribution_guide_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = run_page("docs/attribution.md", 1)
    res = scope["res"]
    assert res.scores.shape == (300,) and np.isfinite(res.scores).all()
    assert len(scope["harmful"]) == 5 and (tmp_path / "scores.npz").exists()
