"""Trials on Ray (hypergradient.apps.tune, `hypergradient run --trials`): a local Ray of 2 CPUs, and the
CLI in processes of its own (each starts its own local Ray and stops it; a killed one is killed with
every process it started)."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
from ray import cloudpickle  # noqa: E402
from ray import tune as rt  # noqa: E402

import problems  # noqa: E402
from ray_processes import kill_tree, ray_env  # noqa: E402
from hypergradient.apps import cli, tune  # noqa: E402
from hypergradient.apps.experiments import folder  # noqa: E402
from hypergradient.errors import ExperimentError  # noqa: E402

pytestmark = pytest.mark.end_to_end  # left to `make test` by the floor leg (Makefile)

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
    assert result["trial"] == best["trial"] and not (out / "best" / "checkpoint").exists()  # the run's checkpoints/ only
    assert (out / "mlflow.db").is_file() and any((out / "mlartifacts").iterdir())


def test_realtime_methods_are_refused(capsys):
    assert cli.main(["run", "realtime", "--tiny", "--trials", "2"]) == 2
    assert "offline methods" in capsys.readouterr().err


# -- ASHA, resuming, Ctrl-C, the lock, and what would hang -----------------------------------

def test_asha_stops_trials_and_marks_them(local_ray, tmp_path):
    # one trial at a time (2 CPUs each), in grid order: the good rate reaches ASHA's first rung
    # (grace period 2) first, and the slow one, worse there, is stopped
    space = {"hyper_lr": rt.grid_search([5e-2, 1e-4]), "hyper_steps": HYPER_STEPS, "steps": 10}
    found = tune.run(build_ridge, space, trials=1, out=tmp_path, scheduler="asha", cpus_per_trial=2)

    rows = {float(r["hyper_lr"]): r for r in read_trials(tmp_path)}
    assert rows[5e-2]["status"] == "done" and int(rows[5e-2]["hyper_steps_run"]) == HYPER_STEPS
    assert rows[1e-4]["status"] == "stopped" and int(rows[1e-4]["hyper_steps_run"]) == 2
    assert found.best["hyper_lr"] == 5e-2 and (tmp_path / "best" / "result.json").is_file()


def test_trials_hold_the_results_folder(tmp_path, capsys):
    out = tmp_path / "out"
    with folder.claim(out):  # another run holds it (flock: a second open of the file conflicts)
        assert cli.main(["run", "distill", "--tiny", "--trials", "2", "--out", str(out), "--no-progress"]) == 2
        with pytest.raises(ExperimentError, match="in use by another run"):
            tune.run(build_ridge, {"hyper_lr": 1e-2, "hyper_steps": 2, "steps": 10}, trials=1, out=out)
    err = capsys.readouterr().err
    assert f"{out} is in use by another run (pid {os.getpid()})" in err
    assert not (out / "ray").exists() and not (out / tune.SETTINGS_FILE).exists()


def cli_command(out, *options: str) -> list[str]:
    return [sys.executable, "-m", "hypergradient.apps.cli", "run", "distill", "--tiny", "--hyper-steps", "4",
            "--out", str(out), "--no-progress", *options]


def start_cli(out, *options: str) -> subprocess.Popen:
    """The CLI in a session of its own, so that the test can kill exactly it and what it started."""
    return subprocess.Popen(cli_command(out, *options), env=ray_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finished_trials(out) -> dict[str, float]:
    """Trial id -> best_objective of the trials whose last report (in Tune's records) says finished."""
    found = {}
    for records in (out / "ray").glob("*/result.json"):
        lines = records.read_text().splitlines()
        for line in lines:
            try:
                report = json.loads(line)
            except ValueError:  # a line being written
                continue
            if report.get(tune.FINISHED):
                found[report["trial_id"]] = report[tune.METRIC]
    return found


def wait_for_a_finished_trial(proc, out, seconds=300) -> dict[str, float]:
    deadline = time.monotonic() + seconds
    while not (found := finished_trials(out)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no trial finished"
        time.sleep(0.2)
    return found


@pytest.mark.slow
def test_rerun_after_kill_9_resumes_and_keeps_the_finished_trials(tmp_path):
    out = tmp_path / "out"
    driver = start_cli(out, "--trials", "3")  # 2 CPUs: the third trial starts when one has finished
    try:
        before = wait_for_a_finished_trial(driver, out)
    finally:
        kill_tree(driver)
    # on a quick machine the last trial can finish before the kill lands: the rerun must then
    # rebuild the table from Tune's records all the same
    (out / "trials.csv").unlink(missing_ok=True)
    again = subprocess.run(cli_command(out, "--trials", "3"), env=ray_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the trials" in again.stderr
    rows = {r["trial"]: r for r in read_trials(out)}
    assert len(rows) == 3 and all(r["status"] == "done" and int(r["hyper_steps_run"]) == 4 for r in rows.values())
    for trial, best_objective in before.items():  # kept, not run again from the start
        assert math.isclose(float(rows[trial]["best_objective"]), best_objective, rel_tol=1e-6)


@pytest.mark.slow
def test_ctrl_c_writes_the_finished_trials_and_says_how_to_resume(tmp_path):
    out = tmp_path / "out"
    # six trials on 2 CPUs: when the first has finished, at least three have not started, so
    # the signal lands before the last trial ends however quick the machine
    driver = start_cli(out, "--trials", "6")
    try:
        wait_for_a_finished_trial(driver, out)
        driver.send_signal(signal.SIGINT)  # Ray's processes have sessions of their own: as a terminal's Ctrl-C
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            kill_tree(driver)
    assert driver.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "trials finished" in last and "run the same command again to resume" in last, err[-3000:]
    rows = read_trials(out)
    assert 1 <= len(rows) < 6 and all(r["status"] == "done" for r in rows)


@pytest.mark.parametrize("options, says", [
    (["--gpus-per-trial", "-1"], "gpus per trial must be a number >= 0"),
    (["--gpus-per-trial", "1024"], "no node of the Ray cluster has more than"),
    (["--ray", "127.0.0.1:1"], "no Ray cluster at 127.0.0.1:1"),
])
def test_what_would_hang_is_refused_in_one_line(tmp_path, options, says):
    started = time.monotonic()
    done = subprocess.run(cli_command(tmp_path / "out", "--trials", "2", *options), env=ray_env(),
                          capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 60
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("hypergradient: error: ") and says in errors[0], done.stderr
