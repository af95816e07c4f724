"""The examples that stand for "any model works" run and improve their objective."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_equinox_model_is_tuned_like_any_other():
    pytest.importorskip("equinox")
    before, after = load("equinox_model").main(hyper_steps=8, steps=20)
    assert after < before


def test_population_tunes_eight_starting_scales_in_one_program():
    res = load("population").main(hyper_steps=3, steps=10)
    assert res.population_values.shape == (8,) and res.history["value"].shape == (3, 8)
    assert res.value == min(res.population_values) and res.hparams["log_lr"].shape == (10,)
