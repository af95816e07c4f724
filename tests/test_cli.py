"""The `hypergradient` command: list, --help, and clean errors (exit code 2, no traceback)."""

from __future__ import annotations

import pytest

from hypergradient.apps import cli, experiments


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
    code, err = error_of(["run", "realtime", "--method", "reverse", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "rtho, trho" in err
    assert not (tmp_path / "x").exists()


def test_bad_hyper_steps(capsys):
    code, err = error_of(["run", "distill", "--hyper-steps", "0"], capsys)
    assert code == 2 and "positive integer" in err


def test_missing_dataset_says_where_it_looked(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("HYPERGRADIENT_MNIST_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = error_of(["run", "distill", "--dataset", "mnist", "--data-dir", str(empty),
                          "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "MNIST not found" in err and str(empty) in err and "--data-dir" in err
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
