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
