"""The examples that stand for "any model works" run and improve their objective."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.end_to_end  # left to `make test` by the floor leg (Makefile)

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


def test_online_example_beats_the_fixed_rate_and_a_longer_trho_window_beats_a_short_one():
    out = subprocess.run([sys.executable, str(EXAMPLES / "online_rtho.py")], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    mse = {line.split(":")[0].strip(): float(re.search(r"validation mse ([0-9.]+)", line).group(1))
           for line in out.splitlines() if "validation mse" in line}
    assert set(mse) == {"fixed lr 0.001", "RTHO (Forward, every 20)", "TRHO (Truncated(20))", "TRHO (Truncated(100))"}
    assert max(v for k, v in mse.items() if k != "fixed lr 0.001") < mse["fixed lr 0.001"] / 2
    assert mse["TRHO (Truncated(100))"] < mse["TRHO (Truncated(20))"]
