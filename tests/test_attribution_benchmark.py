"""The LDS benchmark's own pieces (benchmarks/attribution.py): the one-field-at-a-time settings
sweep, the subsets and the linear-datamodel ceiling (on a synthetic outcome whose answer is known)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.attribution import Setting, datamodel_fit, settings, spearman, subsets  # noqa: E402


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
