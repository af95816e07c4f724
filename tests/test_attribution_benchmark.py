"""benchmarks/attribution.py's own pieces: the hand-over to the Bergson peer, without torch (the
file it writes describes our run exactly: a NumPy replay of heavy-ball training from it gives our
w_T; a missing peer environment is skipped with a message), the one-field-at-a-time settings
sweep, the subsets and the linear-datamodel ceiling (on a synthetic outcome whose answer is
known)."""

import sys
from pathlib import Path

import numpy as np
import pytest

import hypergradient as hg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package, as `python -m` sees it
from benchmarks import attribution  # noqa: E402
from benchmarks.attribution import Setting, datamodel_fit, settings, spearman, subsets  # noqa: E402

pytestmark = pytest.mark.end_to_end  # left to `make test` by the floor leg (Makefile)


def test_peer_file_replays_our_training_run():
    dyn, lam, _, _, _, _, peer = attribution.build("logistic-digits", 200, 50)
    p = {k: np.asarray(v) for k, v in peer.items()}
    assert p["batches"].shape == (dyn.steps, 100)
    x, y = p["x"].astype(np.float64), p["y"]
    W, b = p["W0"].astype(np.float64), p["b0"].astype(np.float64)
    vW, vb = np.zeros_like(W), np.zeros_like(b)
    for rows in p["batches"]:
        logits = x[rows] @ W + b
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        prob[np.arange(len(rows)), y[rows]] -= 1
        gW = x[rows].T @ prob / len(rows) + float(p["l2"]) * W
        gb = prob.mean(0)
        vW, vb = float(p["momentum"]) * vW + gW, float(p["momentum"]) * vb + gb
        W, b = W - float(p["lr"]) * vW, b - float(p["lr"]) * vb
    w_T = hg.dynamics.train(dyn, lam)[0].params
    np.testing.assert_allclose(np.asarray(w_T[0]["W"]), W, atol=2e-4)
    np.testing.assert_allclose(np.asarray(w_T[0]["b"]), b, atol=2e-4)
    assert np.abs(W).max() > 1e-2  # the run moved the weights: the comparison is not of two zero starts


def test_missing_bergson_environment_is_skipped_with_a_message(tmp_path):
    out = attribution.bergson({"x": np.zeros(1)}, str(tmp_path / "no-venv" / "python"), False, 1)
    assert out.startswith("not measured: no Bergson environment at ")
    table = attribution.table([{"problem": "p", "keep": "", "method": "bergson", "note": out}])
    assert "| bergson | not measured" in table


def test_table_shows_a_peer_row_without_per_example_scores():
    record = {"problem": "p", "keep": 0.5, "method": "bergson", "lds_mean_loss": 0.7, "lds_per_example": None,
              "x_train_mean": 40.0, "x_train_rows": None, "temp_mb": None, "peak_rss_growth_mb": 5.0}
    assert "| p |  | — | 50% | bergson | 0.700 | — | 40.0 | — | RSS +5.0 |" in attribution.table([record])


def test_sweep_changes_one_field_at_a_time():
    base = Setting(lr=0.1, steps=300)
    got = settings(base, ["activation=relu,silu", "lr=0.03,0.1", "batch=400"])
    assert got == [base, Setting(0.1, 300, activation="relu"), Setting(0.03, 300), Setting(0.1, 300, batch=400)]


@pytest.mark.parametrize("sweep", ["momentum=0.5", "lr", "lr="])
def test_sweep_refuses_unknown_fields(sweep):
    with pytest.raises(ValueError, match="FIELD=V1,V2"):
        settings(Setting(0.1, 300), [sweep])


def test_subsets_keep_the_fraction():
    masks = subsets(50, 20, 0.3, seed=0)
    assert masks.shape == (20, 50) and set(np.unique(masks)) == {0.0, 1.0}
    assert (masks.sum(1) == 15).all()


def test_datamodel_fit_recovers_a_linear_outcome():
    """Over subsets of a fixed size the coefficients are identified up to a common shift (the
    intercept takes it), so they are compared by correlation."""
    rng = np.random.default_rng(0)
    n, coef = 40, rng.normal(size=40)
    fit, test = subsets(n, 400, 0.5, seed=1), subsets(n, 100, 0.5, seed=2)
    outcome = fit @ coef + 0.01 * rng.normal(size=len(fit))
    got = datamodel_fit(fit, outcome)
    assert np.corrcoef(got, coef)[0, 1] > 0.99
    assert spearman(test @ coef, test @ got) > 0.99
