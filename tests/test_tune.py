"""Trials on Ray (hypergradient.apps.tune, `hypergradient run --trials`): a local Ray of 2 CPUs."""

from __future__ import annotations

import csv
import json
import math
import sys

import pytest

ray = pytest.importorskip("ray")
from ray import cloudpickle  # noqa: E402
from ray import tune as rt  # noqa: E402

import problems  # noqa: E402
from hypergradient.apps import cli, tune  # noqa: E402

HYPER_STEPS = 6

# The workers cannot import the tests' modules: send their functions by value.
cloudpickle.register_pickle_by_value(problems)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def build_ridge(config):
    return problems.ridge_problem(steps=config["steps"])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def read_trials(out):
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_trials_write_every_trial_and_the_best(local_ray, tmp_path):
    space = {"hyper_lr": rt.grid_search([1e-3, 1e-2, 5e-2]), "hyper_steps": HYPER_STEPS, "steps": 10}
    found = tune.run(build_ridge, space, trials=1, out=tmp_path)

    rows = read_trials(tmp_path)
    assert len(rows) == len(found.rows) == 3
    assert {float(r["hyper_lr"]) for r in rows} == {1e-3, 1e-2, 5e-2}
    assert all(r["status"] == "done" and int(r["hyper_steps_run"]) == HYPER_STEPS for r in rows)
    assert all(len(curve) == HYPER_STEPS for curve in found.curves.values())
    best = min(rows, key=lambda r: float(r["best_objective"]))
    assert found.best["trial"] == best["trial"]
    assert float(best["best_objective"]) <= min(min(c) for c in found.curves.values())
    result = json.loads((tmp_path / "best" / "result.json").read_text())
    assert result["trial"] == best["trial"] and math.isclose(result["best_objective"], float(best["best_objective"]), rel_tol=1e-6)
    assert (tmp_path / "best" / "checkpoint" / "optimize").is_dir()
    assert (tmp_path / "trials.png").stat().st_size > 0


def test_cli_trials_with_optuna_and_mlflow(local_ray, tmp_path):
    out = tmp_path / "out"
    argv = ["run", "distill", "--tiny", "--hyper-steps", "4", "--trials", "2", "--search", "optuna",
            "--mlflow", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0

    rows = read_trials(out)
    assert len(rows) == 2 and all(int(r["hyper_steps_run"]) == 4 for r in rows)
    best = min(rows, key=lambda r: float(r["best_objective"]))
    config = json.loads((out / "best" / "config.json").read_text())
    assert math.isclose(config["hyper_lr"], float(best["hyper_lr"]), rel_tol=1e-6) and config["seed"] == int(best["seed"])
    result = json.loads((out / "best" / "result.json").read_text())
    assert math.isclose(result["selected_value"], float(best["best_objective"]), rel_tol=1e-5)
    assert all((out / "best" / plot).is_file() for plot in result["plots"])
    assert (out / "mlflow.db").is_file() and any((out / "mlartifacts").iterdir())


def test_realtime_methods_are_refused(capsys):
    assert cli.main(["run", "realtime", "--tiny", "--trials", "2"]) == 2
    assert "offline methods" in capsys.readouterr().err
