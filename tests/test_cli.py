"""The `hypergradient` command: list, --help, and clean errors (exit code 2, no traceback)."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hypergradient as hg
from hypergradient.apps import cli, experiments
from hypergradient.apps.experiments import folder, runner

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
HOLD_FOLDER = """
import sys, time
from pathlib import Path
from hypergradient.apps.experiments import folder, runner

with folder.claim(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# Runs the command line with the packages that only an extra brings hidden, as after a plain
# `pip install hypergradient`.
PLAIN_INSTALL = """
import sys


class NotInstalled:  # first on the import path: the blocked modules cannot be imported or found
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)


sys.meta_path.insert(0, NotInstalled())
from hypergradient.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_list_shows_every_experiment_with_its_description(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in experiments.names():
        assert name in out
        assert experiments.DESCRIPTIONS[name] in out


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_help_exits_zero(argv, capsys):
    assert cli.main(argv) == 0
    assert "usage: hypergradient" in capsys.readouterr().out


def test_run_help_explains_every_option(capsys):
    cli.main(["run", "--help"])
    out = capsys.readouterr().out
    for option in ("--dataset", "--data-dir", "--method", "--hyper-steps", "--seed", "--out", "--tiny"):
        assert option in out
    for name in experiments.names():  # the methods of each experiment are listed
        assert ", ".join(experiments.get(name).METHODS) in out


def error_of(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_unknown_experiment(capsys):
    code, err = error_of(["run", "no-such-experiment"], capsys)
    assert code == 2 and "invalid choice" in err and "schedules" in err


def test_unknown_dataset(capsys):
    code, err = error_of(["run", "distill", "--dataset", "cifar"], capsys)
    assert code == 2 and "invalid choice" in err and "fashion-mnist" in err


def test_unknown_method_names_the_ones_that_apply(capsys, tmp_path):
    code, err = error_of(["run", "realtime", "--method", "drmad", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "rtho, trho, pes, nres, reverse, es" in err
    assert not (tmp_path / "x").exists()


def test_bad_hyper_steps(capsys):
    code, err = error_of(["run", "distill", "--hyper-steps", "0"], capsys)
    assert code == 2 and "positive integer" in err


def test_negative_seed_is_a_usage_error(capsys):
    code, err = error_of(["run", "distill", "--seed", "-1"], capsys)
    assert code == 2 and "--seed: expected a non-negative integer, got -1" in err


@pytest.mark.parametrize("command", [["run", "distill"], ["compare", "schedules", "--methods", "hypergradient"]])
@pytest.mark.parametrize("below", ["", "sub"])
def test_out_naming_a_file_is_a_usage_error(capsys, tmp_path, command, below):
    file = tmp_path / "file"
    file.write_text("mine")
    code, err = error_of([*command, "--out", str(file / below)], capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert err.rstrip().endswith(f"cannot write the results to {file / below}: {file} is a file, not a folder")
    assert file.read_text() == "mine"


def test_missing_dataset_says_where_it_looked(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("HYPERGRADIENT_MNIST_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = error_of(["run", "distill", "--dataset", "mnist", "--data-dir", str(empty),
                          "--out", str(tmp_path / "out")], capsys)
    assert code == 3
    assert "MNIST not found" in err and str(empty) in err and "--data-dir" in err
    assert not (tmp_path / "out").exists()


def test_truncated_data_file_is_a_one_line_error_naming_it(capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for stem in IDX_FILES:  # as an interrupted copy leaves them
        (data / f"{stem}.gz").write_bytes(gzip.compress(bytes(4096))[:30])
    code, err = error_of(["run", "distill", "--dataset", "fashion-mnist", "--data-dir", str(data),
                          "--out", str(tmp_path / "out")], capsys)
    assert code == 3
    assert err.startswith(f"hypergradient: error: {data / 'train-images-idx3-ubyte.gz'}: truncated")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_data_dir_fails_even_with_the_dataset_elsewhere(capsys, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for stem in IDX_FILES:
        (elsewhere / stem).touch()
    monkeypatch.setenv("HYPERGRADIENT_FASHION_MNIST_DIR", str(elsewhere))
    code, err = error_of(["run", "distill", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "typo"),
                          "--out", str(tmp_path / "out")], capsys)
    assert code == 3
    assert "Fashion-MNIST not found" in err and f"{tmp_path / 'typo'} (no such folder)" in err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_says_how_to_resume(capsys, tmp_path, monkeypatch):
    module = experiments.get("distill")

    def interrupted(config, out_dir, progress=None):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run", interrupted)
    code, err = error_of(["run", "distill", "--out", str(tmp_path / "run")], capsys)
    assert code == 130
    assert "resume" in err and str(tmp_path / "run") in err
    assert (tmp_path / "run" / "config.json").exists()


def test_a_checkpoint_of_another_problem_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    def mismatch(config, out_dir, progress=None):
        raise hg.CheckpointMismatchError(f"checkpoint {out_dir}/checkpoints is from a different problem")

    monkeypatch.setattr(experiments.get("distill"), "run", mismatch)
    code, err = error_of(["run", "distill", "--out", str(tmp_path / "run")], capsys)
    assert code == 3 and "is from a different problem" in err


def test_default_results_folder_names_experiment_dataset_and_method(capsys, tmp_path, monkeypatch):
    module = experiments.get("l2-per-weight")
    seen = {}

    def fake(config, out_dir, progress=None):
        seen.update(config=config, out=out_dir)
        return {"experiment": "l2-per-weight", "val_loss_shared": 1.0, "plots": []}

    monkeypatch.setattr(module, "run", fake)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "l2-per-weight", "--method", "truncated", "--seed", "3",
                     "--hyper-steps", "7", "--tiny"]) == 0
    assert str(seen["out"]) == "results/l2-per-weight-digits-truncated-tiny-seed3"
    assert seen["config"].seed == 3 and seen["config"].hyper_steps == 7
    assert seen["config"].method == "truncated"
    assert "val_loss_shared" in capsys.readouterr().out


def extras_only_modules() -> set[str]:
    """The installed top-level modules that only an extra of pyproject.toml brings."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(PYPROJECT.read_text())["project"]

    def names(requirements):
        return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", r).group(0)).lower() for r in requirements}

    core = names(project["dependencies"])
    extras = set().union(*map(names, project["optional-dependencies"].values())) - core
    return {module for module, dists in importlib.metadata.packages_distributions().items()
            if names(dists) <= extras}


def plain_install(*argv):
    script = PLAIN_INSTALL.format(blocked=extras_only_modules())
    return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                          timeout=600, env=os.environ)


@pytest.mark.slow
def test_plain_install_runs_the_default_job_and_names_the_extra_of_compare(tmp_path):
    assert {"optuna", "pytest"} <= extras_only_modules()
    done = plain_install("run", "schedules", "--tiny", "--hyper-steps", "2", "--no-progress",
                         "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "result.json").read_text())["plots"]

    refused = plain_install("compare", "schedules", "--tiny", "--out", str(tmp_path / "compare"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == (
        "hypergradient compare: error: random, tpe and hybrid need optuna, which is not installed: "
        "pip install 'hypergradient[compare]' (or leave them out: --methods hypergradient,online)")
    assert not (tmp_path / "compare").exists()


def test_license_is_an_spdx_expression_the_required_setuptools_reads():
    tomllib = pytest.importorskip("tomllib")
    licenses = pytest.importorskip("packaging.licenses")
    from packaging.requirements import Requirement

    pyproject = tomllib.loads(PYPROJECT.read_text())
    license = pyproject["project"]["license"]  # a table is deprecated: a warning at every install
    assert isinstance(license, str) and licenses.canonicalize_license_expression(license) == license
    (setuptools,) = [Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    assert "76" not in setuptools.specifier and "77.0" in setuptools.specifier  # PEP 639 support began at 77


def test_a_second_run_into_a_held_folder_is_refused_until_the_holder_dies(capsys, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=os.environ)
    try:
        assert holder.stdout.readline() == "held\n"
        code, err = error_of(["run", "distill", "--tiny", "--no-progress", "--out", str(out)], capsys)
        assert code == 3
        assert f"{out} is in use by another run (pid {holder.pid})" in err
        assert not (out / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    with folder.claim(out):  # the system released the lock with the process
        assert (out / folder.LOCK_FILE).read_text() == str(os.getpid())


def test_a_run_killed_after_config_json_leaves_no_results_of_another_configuration(capsys, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "checkpoints" / "optimize").mkdir(parents=True)  # a finished run with seed 0
    (out / "checkpoints" / "optimize" / "optimize.npz").write_bytes(b"old")
    folder.write_json(out / "config.json", experiments.get("distill").tiny().resolved())
    folder.write_json(out / "result.json", {"plots": ["distilled_images.png"], "arrays": ["distilled_images.npy"]})
    for name in ("history.csv", "distilled_images.png", "distilled_images.npy", "notes.txt"):
        (out / name).write_text("old")

    def killed(*args):
        raise KeyboardInterrupt  # as if killed once the stages begin

    monkeypatch.setattr(runner, "_stages", killed)
    code, _ = error_of(["run", "distill", "--tiny", "--seed", "1", "--no-progress", "--out", str(out)], capsys)
    assert code == 130
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    (previous,) = out.glob(folder.PREVIOUS + "*")  # the seed-0 run, whole, beside it
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json", "notes.txt", previous.name]
    assert json.loads((previous / "config.json").read_text())["seed"] == 0
    assert (previous / "checkpoints" / "optimize" / "optimize.npz").read_bytes() == b"old"


@pytest.mark.slow
def test_a_second_run_takes_its_programs_from_the_compilation_cache(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # benchmarks/, as `python -m` sees it
    from benchmarks.compile_cache import one_run

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("HYPERGRADIENT_COMPILE_CACHE")  # on by default
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cache = tmp_path / "xdg" / "hypergradient" / "jax"
    args = ["schedules", "--tiny", "--hyper-steps", "1"]
    first = one_run(args, str(tmp_path / "first"), env, timeout=600)
    entries = set(cache.iterdir())
    assert entries and first["cache_misses"] >= 1
    second = one_run(args, str(tmp_path / "second"), env, timeout=600)
    assert second["cache_hits"] >= len(entries) - 1 and second["cache_misses"] <= 1
    assert second["compile_seconds"] < 0.5 * first["compile_seconds"]  # reading from the cache, on a hit


def test_the_cache_folder_follows_the_flag_and_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("HYPERGRADIENT_COMPILE_CACHE")
    assert cli.compile_cache_dir() == tmp_path / "hypergradient" / "jax"
    assert cli.compile_cache_dir(disabled=True) is None
    monkeypatch.setenv("HYPERGRADIENT_COMPILE_CACHE", "off")
    assert cli.compile_cache_dir() is None
    monkeypatch.setenv("HYPERGRADIENT_COMPILE_CACHE", str(tmp_path / "mine"))
    assert cli.compile_cache_dir() == tmp_path / "mine"
    args = cli.build_parser().parse_args(["run", "schedules", "--no-compile-cache"])
    assert args.no_compile_cache


def test_run_reads_its_data_once(capsys, tmp_path, monkeypatch):
    """The check before anything is written and the run share one load of the data."""
    kind = runner.experiment_class(experiments.get("l2-per-weight"))
    reads = []
    load = kind.load_data.__func__
    monkeypatch.setattr(kind, "load_data", classmethod(lambda cls, config: reads.append(config) or load(cls, config)))
    runner.load_data.cache_clear()
    assert cli.main(["run", "l2-per-weight", "--tiny", "--hyper-steps", "1", "--no-progress",
                     "--out", str(tmp_path / "run")]) == 0
    assert len(reads) == 1
