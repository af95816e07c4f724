"""Every error of `hypergradient run` is one line with a documented exit code, and nothing is lost.

The command runs in-process through ``cli.main``; where a real run would take a minute, the
failing piece (a write, the run itself) is replaced, and the code around it is the real one.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import struct
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergradient as hg
from hypergradient.apps import cli, experiments, terminal
from hypergradient.apps.experiments import folder, runner
from problems import ridge_problem

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def one_line_error(argv, capsys, code):
    """Run ``argv``; check the exit code and that stderr's last line is the only error line."""
    got = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert got == code, err
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    return errors[0]


def test_help_documents_every_exit_code(capsys):
    for argv in (["--help"], ["run", "--help"]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "exit codes:" in out
        for code, words in ((1, "diverged"), (2, "usage error"), (3, "bad input"), (130, "interrupted")):
            assert any(line.split()[:1] == [str(code)] and words in line for line in out.splitlines()), (code, out)


def test_read_only_out_is_bad_input(capsys, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: refuse the write as a read-only mount would
        real = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if locked in self.parents:
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    else:
        locked.chmod(0o500)
    line = one_line_error(["run", "distill", "--tiny", "--no-progress", "--out", str(locked / "run")], capsys, 3)
    assert f"cannot write the results to {locked / 'run'}" in line and "choose another --out" in line
    assert not (locked / "run").exists()


def test_full_disk_is_bad_input_and_says_how_to_go_on(capsys, tmp_path, monkeypatch):
    def full(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(folder, "write_json", full)
    out = tmp_path / "run"
    line = one_line_error(["run", "distill", "--tiny", "--no-progress", "--out", str(out)], capsys, 3)
    assert f"cannot write {out / 'config.json'}: no space left on device" in line
    assert "run the same command again" in line


def write_idx(folder_: Path, n_train: int, n_test: int) -> None:
    """The four IDX files of an MNIST-like set of 28x28 images."""
    folder_.mkdir()
    for stem, n in zip(IDX_FILES, (n_train, n_train, n_test, n_test)):
        if "images" in stem:
            raw = struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28) + bytes(n * 28 * 28)
        else:
            raw = struct.pack(">BBBBI", 0, 0, 8, 1, n) + bytes(np.arange(n, dtype=np.uint8) % 10)
        (folder_ / stem).write_bytes(raw)


def test_too_few_images_is_refused_before_anything_is_written(capsys, tmp_path):
    data = tmp_path / "data"
    write_idx(data, n_train=50, n_test=50)  # distill --tiny needs 200 + 200 training images
    out = tmp_path / "run"
    line = one_line_error(["run", "distill", "--tiny", "--dataset", "mnist", "--data-dir", str(data),
                           "--no-progress", "--out", str(out)], capsys, 3)
    assert "mnist has 50 official training images: n_train=200 + n_val=200 = 400 is too many" in line
    assert not out.exists()


def test_the_library_checks_the_data_before_writing_config_json(tmp_path):
    data = tmp_path / "data"
    write_idx(data, n_train=50, n_test=50)
    module = experiments.get("distill")
    config = dataclasses.replace(module.tiny("mnist"), data_dir=str(data))
    with pytest.raises(ValueError, match="too many"):
        module.run(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, says", [("99999999999999999999", "at most 4294967295"),
                                         ("-1", "non-negative"), ("x", "non-negative integer")])
def test_a_seed_out_of_range_is_a_usage_error(capsys, value, says):
    line = one_line_error(["run", "distill", "--tiny", "--seed", value], capsys, 2)
    assert "--seed" in line and says in line


def test_the_largest_seed_is_one_jax_takes(monkeypatch, capsys, tmp_path):
    seen = {}

    def fake(config, out_dir, progress=None):
        seen["key"] = jax.random.PRNGKey(config.seed)  # what the experiments build from it
        return {"experiment": "distill", "plots": []}

    monkeypatch.setattr(experiments.get("distill"), "run", fake)
    assert cli.main(["run", "distill", "--tiny", "--seed", str(terminal.MAX_SEED), "--out", str(tmp_path)]) == 0
    assert int(seen["key"][-1]) == 2**32 - 1


@pytest.mark.parametrize("command", [["run", "distill"], ["compare", "schedules", "--methods", "hypergradient"]])
def test_an_empty_out_is_a_usage_error(capsys, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    code = cli.main([*command, "--out", ""])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    err_line = err.strip().splitlines()[-1]
    assert "--out: expected a folder, got an empty path" in err_line
    assert not (tmp_path / "results").exists()


TENSORSTORE_ERROR = (
    'OUT_OF_RANGE: Error reading "opt_state.6/.zarray" in OCDBT database: Requested byte range [0, 1824) is not '
    "valid for value of size 20 [tensorstore_spec[1]='{\"base\":{\"driver\":\"zarr\",\n\"path\":\"x\"}'] "
    "[tensorstore_spec='{\"context\":{\"cache_pool\":{}}}']")


@pytest.mark.parametrize("error, code, says", [
    (hg.CheckpointMismatchError("OUT/checkpoints/optimize is not a readable hypergradient checkpoint: "
                                + TENSORSTORE_ERROR), 3, "valid for value of size 20"),
    (hg.CheckpointMismatchError("checkpoint OUT is from a different problem"), 3, "from a different problem"),
    (folder.FolderError("OUT is in use by another run (pid 7)"), 3, "in use by another run"),
    (hg.MethodError("Reversible cannot serve adam"), 2, "Reversible cannot serve adam"),
    (hg.DivergenceError("training diverged at step 3"), 1, "the run diverged: training diverged at step 3"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x"), 3, "/data/x: No such file"),
])
def test_each_failure_of_a_run_is_one_line_with_its_code(capsys, tmp_path, monkeypatch, error, code, says):
    def failing(config, out_dir, progress=None):
        raise error

    monkeypatch.setattr(experiments.get("distill"), "run", failing)
    line = one_line_error(["run", "distill", "--tiny", "--out", str(tmp_path / "run")], capsys, code)
    assert says in line
    assert "tensorstore_spec" not in line


def test_ctrl_c_is_interrupted(capsys, tmp_path, monkeypatch):
    def interrupted(config, out_dir, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments.get("distill"), "run", interrupted)
    assert cli.main(["run", "distill", "--tiny", "--out", str(tmp_path / "run")]) == 130


# -- a rerun with other settings keeps the earlier results -----------------------------------------

def finished_run(out: Path, config) -> None:
    """A results folder as a finished run of ``config`` leaves it."""
    (out / "checkpoints" / "optimize").mkdir(parents=True)
    (out / "checkpoints" / "optimize" / "state").write_text("old")
    folder.write_json(out / "config.json", config)
    folder.write_json(out / "result.json", {"plots": ["distilled_images.png"], "arrays": ["distilled_images.npy"]})
    for name in ("history.csv", "distilled_images.png", "distilled_images.npy"):
        (out / name).write_text("old")


def test_a_rerun_with_other_settings_moves_the_previous_run_aside(capsys, tmp_path):
    out = tmp_path / "out"
    before = experiments.get("distill").tiny().resolved()
    finished_run(out, before)
    (out / "notes.txt").write_text("mine")
    after = dataclasses.replace(before, seed=1)
    folder.prepare(out, after, ("hyper_steps",))
    err = capsys.readouterr().err.strip().splitlines()
    (previous,) = out.glob("previous-*")
    assert err[0] == (f"the configuration differs from the one in {out} (seed): moved the previous run to "
                      f"{previous}; starting afresh")
    assert sorted(p.name for p in previous.iterdir()) == sorted(
        ["checkpoints", "config.json", "result.json", "history.csv", "distilled_images.png", "distilled_images.npy"])
    assert json.loads((previous / "config.json").read_text())["seed"] == 0
    assert (previous / "checkpoints" / "optimize" / "state").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt", previous.name]
    assert json.loads((out / "config.json").read_text())["seed"] == 1

    folder.prepare(out, before, ("hyper_steps",))  # and back: a second folder, the first untouched
    assert len(list(out.glob("previous-*"))) == 1  # nothing but config.json was there to move
    finished_run_again = out / "history.csv"
    finished_run_again.write_text("new")
    folder.write_json(out / "result.json", {"plots": []})
    folder.prepare(out, after, ("hyper_steps",))
    assert len(list(out.glob("previous-*"))) == 2


def test_a_resumable_change_keeps_the_checkpoints_and_moves_the_results(capsys, tmp_path):
    out = tmp_path / "out"
    before = experiments.get("distill").tiny().resolved()
    finished_run(out, before)
    more = dataclasses.replace(before, hyper_steps=before.hyper_steps + 5)
    folder.prepare(out, more, ("hyper_steps",))
    err = capsys.readouterr().err
    (previous,) = out.glob("previous-*")
    assert f"(hyper_steps): moved the previous run to {previous}\n" in err
    assert f"resuming from the checkpoints in {out / 'checkpoints'}" in err
    assert (out / "checkpoints" / "optimize" / "state").read_text() == "old"
    assert (previous / "history.csv").read_text() == "old" and not (out / "history.csv").exists()


def test_the_same_settings_keep_everything_in_place(capsys, tmp_path):
    out = tmp_path / "out"
    config = experiments.get("distill").tiny().resolved()
    finished_run(out, config)
    folder.prepare(out, config, ("hyper_steps",))
    assert not list(out.glob("previous-*")) and (out / "history.csv").read_text() == "old"


def test_the_command_says_where_the_previous_run_went(capsys, tmp_path, monkeypatch):
    out = tmp_path / "out"
    finished_run(out, experiments.get("distill").tiny().resolved())

    def stop(*args):
        raise KeyboardInterrupt  # once the folder is prepared

    monkeypatch.setattr(runner, "_stages", stop)
    assert cli.main(["run", "distill", "--tiny", "--seed", "2", "--no-progress", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    (previous,) = out.glob("previous-*")
    assert f"moved the previous run to {previous}" in err
    assert (previous / "result.json").exists()


# -- smaller items ---------------------------------------------------------------------------------

def test_a_population_member_that_diverged_scores_inf_even_where_its_training_is_finite():
    """Member 1's hypergradient is not finite (∂√c/∂c at c = 0) while its training and objective
    are: it diverged at every hyper-step and keeps that λ, so its final objective is inf, not the
    finite value of a run that was refused (as a float32 loss of 1.36e30 with an overflowed
    gradient was)."""
    dyn, objective, lam = ridge_problem(steps=5)
    population = {"log_l2": jnp.stack([lam["log_l2"]] * 2), "lr": jnp.stack([lam["lr"]] * 2),
                  "c": jnp.asarray([1.0, 0.0])}
    res = hg.optimize(dyn, lambda w, lam: objective(w, lam) + jnp.sqrt(lam["c"]), population, hyper_steps=2,
                      population_axis=0, progress=False)
    assert np.isinf(res.history["value"][:, 1]).all()
    assert np.isfinite(res.population_values[0]) and np.isinf(res.population_values[1])


def test_a_population_member_whose_objective_runs_away_scores_inf():
    """Members 2 and 3 train like the others but their objectives are 1e8 (beyond 1e6 × the
    population's median) and 2e30 (beyond 1e30): runs that diverged without overflowing."""
    dyn, objective, lam = ridge_problem(steps=5)
    population = {"log_l2": jnp.stack([lam["log_l2"]] * 4), "lr": jnp.stack([lam["lr"]] * 4),
                  "c": jnp.asarray([0.0, 1.0, 1e8, 2e30])}
    res = hg.optimize(dyn, lambda w, lam: objective(w, lam) + lam["c"], population, hyper_steps=2,
                      population_axis=0, progress=False)
    assert np.isfinite(res.history["value"][:, :2]).all() and np.isinf(res.history["value"][:, 2:]).all()
    assert np.isfinite(res.population_values[:2]).all() and np.isinf(res.population_values[2:]).all()
    assert res.value == min(res.population_values[:2])


def test_the_first_eta_leaves_out_the_compilation(monkeypatch, capsys):
    """A first step of 30 s (compiling), then 1 s a step: after 3 steps, 97 steps of 1 s are left."""
    from hypergradient.drivers import progress

    clock = iter([0.0, 30.0, 31.0, 32.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    meter = progress.TextProgressMeter(every_seconds=0)
    with meter.running(100) as run:
        for _ in range(3):
            progress.tick(run, 0.5)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "hyper-steps 1/100: objective 0.5, first step 30 s (compilation included)"
    assert lines[2] == "hyper-steps 3/100: objective 0.5, 1 s/step, 97 s left"


def test_a_chaotic_run_warns_once_with_the_worst_figure(capsys, recwarn):
    figures = [3e4, 2e9, float("inf"), 5e5] * 31  # 124 hyper-steps, each with its caveat
    with runner.caveats_once("optimize"):
        for growth in figures:
            grew = hg.methods.reverse.grew(growth)
            warnings.warn(hg.ChaosWarning(f"the backward pass {grew} (largest ‖α_t‖ against ‖α_T‖): chaotic"))
        warnings.warn("something else", DeprecationWarning)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["warning: optimize: ChaosWarning at 124 hyper-steps; the worst: the backward pass overflowed "
                     "(largest ‖α_t‖ against ‖α_T‖): chaotic"]
    assert [str(w.message) for w in recwarn] == ["something else"]  # other warnings pass through


def test_one_chaotic_hyper_step_is_said_as_it_was(capsys):
    with runner.caveats_once("optimize"):
        warnings.warn(hg.ChaosWarning("the backward pass grew 2e+09x: chaotic"))
    assert capsys.readouterr().err == "warning: optimize: ChaosWarning: the backward pass grew 2e+09x: chaotic\n"


def test_ctrl_c_during_tuning_writes_the_history_and_plot_of_the_finished_hyper_steps(capsys, tmp_path,
                                                                                     monkeypatch):
    def interrupted_after_three(dyn, objective, lam0, *, progress, **options):
        with progress.running(10) as run:
            for k in range(3):
                hg.drivers.progress.tick(run, 1.0 / (k + 1))
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.hg, "optimize", interrupted_after_three)
    out = tmp_path / "run"
    assert cli.main(["run", "l2-per-weight", "--tiny", "--no-progress", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert (f"wrote the 3 hyper-steps finished before the interruption to {out / 'history.csv'} and "
            f"{out / 'interrupted.png'}") in err
    rows = (out / "history.csv").read_text().splitlines()
    assert rows[0] == "search,hyper_step,value" and rows[1:] == ["optimize,0,1", "optimize,1,0.5", "optimize,2,0.33333333"]
    assert (out / "interrupted.png").read_bytes().startswith(b"\x89PNG")


def test_process_local_batches_refuse_the_whole_arrays_on_every_process(monkeypatch):
    """Two processes (simulated: the all-gather hands back this process's fingerprint twice, as two
    processes holding the same rows would) each passing all the rows are refused by name; different
    shares pass the check."""
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    x, y = np.arange(40.0).reshape(20, 2), np.arange(20)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda a: np.stack([a, a]))
    with pytest.raises(ValueError, match="all 2 processes passed the same 20 rows"):
        hg.Batches((x, y), 4, mesh=mesh, process_local=True)
    other = np.asarray([[12345]])
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda a: np.concatenate([a[None], other]))
    data = hg.Batches((x, y), 4, mesh=mesh, process_local=True)
    assert data.arrays[0].shape == (20, 2)
