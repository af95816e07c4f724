"""Every experiment, in its tiny configuration, through the command line (in-process).

Each test checks that the experiment beats its baseline on the quantity it
optimizes (and, where that is robust at this size, on held-out data) and
that it writes its results folder. Seeds are fixed, so the figures are
deterministic; the margins asserted are far from the measured ones.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergradient as hg
from hypergradient.apps.cli import main
from hypergradient.apps import datasets, experiments
from hypergradient.apps.experiments import plots, realtime, resnet, runner
from hypergradient.errors import ExperimentError

pytestmark = pytest.mark.end_to_end  # left to `make test` by the floor leg (Makefile)


def run_tiny(tmp_path, capsys, name, *extra):
    out = tmp_path / name
    code = main(["run", name, "--tiny", "--no-progress", "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    for f in ("config.json", "history.csv", "result.json"):
        assert (out / f).is_file(), f
    result = json.loads((out / "result.json").read_text())
    assert result["plots"], "no plot written"
    for png in result["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "digits"
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows, "history.csv is empty"
    assert "summary" in captured.out  # the summary table
    return result, config, rows, captured


def test_schedules_beats_the_best_constant_learning_rate(tmp_path, capsys):
    result, config, rows, out = run_tiny(tmp_path, capsys, "schedules")
    assert config["method"] == "reverse" and config["hyper_steps"] == len(rows)
    assert result["val_loss_after"] < 0.9 * result["val_loss_before"]
    assert result["val_error_after"] <= result["val_error_before"]
    assert float(rows[-1]["value"]) < float(rows[0]["value"])
    assert "validation loss" in out.err and "best constant" in out.err
    assert {"schedules.png", "learning_curve.png"} <= set(result["plots"])


def test_hyper_cleaning_beats_the_baseline_and_finds_flipped_labels(tmp_path, capsys):
    result, _, rows, _ = run_tiny(tmp_path, capsys, "hyper-cleaning")
    assert result["hyper_cleaning_test_accuracy"] > result["baseline_test_accuracy"] + 0.05
    assert result["oracle_test_accuracy"] > result["baseline_test_accuracy"]
    assert result["hyper_cleaning_f1"] > 0.6
    (row,) = result["per_R"]
    assert row["val_loss_after"] < row["val_loss_before"]
    assert "val_loss_R=100" in rows[0]


def test_realtime_beats_the_fixed_hyperparameters_in_one_run(tmp_path, capsys):
    result, config, rows, _ = run_tiny(tmp_path, capsys, "realtime", "--method", "trho")
    assert config["method"] == "trho"
    assert result["val_loss_tuned"] < result["val_loss_fixed"]
    assert result["test_error_tuned"] < result["test_error_fixed"]
    assert result["lr_end"] != pytest.approx(result["lr_start"])
    assert len(rows) == result["hyper_updates"] == config["hyper_steps"]
    assert all(float(r["lr"]) > 0 for r in rows)
    assert result["seconds_fixed"] > 0 and result["seconds_tuning"] > 0


def test_realtime_offline_comparator_tunes_the_same_constant_hyperparameters(tmp_path, capsys):
    result, config, rows, out = run_tiny(tmp_path, capsys, "realtime", "--method", "reverse")
    assert len(rows) == result["hyper_updates"] == config["offline_hyper_steps"]
    assert result["training_steps"] == config["hyper_steps"] * config["every"]  # the online run's length
    assert result["val_loss_tuned"] < result["val_loss_fixed"]
    assert result["seconds_fixed"] > 0 and result["seconds_tuning"] > 0
    assert "hyper-steps of Adam (reverse)" in out.err


@pytest.mark.parametrize("method", ["rtho", "reverse"])
def test_realtime_keeps_the_hyperparameters_in_their_box(tmp_path, method):
    # a box too narrow for where λ goes on its own (the learning rate rises, the L2 strength falls)
    config = dataclasses.replace(realtime.tiny(), method=method, lr_bounds=(5e-4, 1.2e-3), l2_bounds=(9e-4, 2e-3))
    result = realtime.run(config, tmp_path / method, progress=False)
    with open(tmp_path / method / "history.csv") as f:
        rows = list(csv.DictReader(f))
    for key, (lo, hi) in (("lr", config.lr_bounds), ("l2", config.l2_bounds)):
        values = [float(r[key]) for r in rows] + [result[f"{key}_end"]]
        assert all(lo * (1 - 1e-5) <= v <= hi * (1 + 1e-5) for v in values), (key, values)
        assert max(values) > 0.99 * hi or min(values) < 1.01 * lo  # the box was reached


def test_realtime_refuses_a_start_outside_the_box():
    config = dataclasses.replace(realtime.tiny(), lr0=1.0).resolved()
    data = datasets.load(config.dataset, n_train=config.n_train, n_val=config.n_val, n_test=config.n_test)
    with pytest.raises(ExperimentError, match="must lie in their bounds"):
        realtime.Realtime(config, data)


def test_realtime_hypergradient_is_the_slope_of_the_validation_loss():
    # The CNN must train by a step continuous in the weights: with relu, whose derivative jumps,
    # this hypergradient of 400 Adam steps is 4% off the slope (and of the wrong sign through 600
    # steps of the default CNN), which is what drove realtime's learning rate towards 0.
    config = dataclasses.replace(realtime.tiny(), method="reverse", hyper_steps=1, every=400, lr0=3e-3)
    dyn, objective, lam0 = runner.problem(realtime, config)
    grad = hg.value_and_grad(dyn, objective, lam0, method=hg.Reverse()).grad["log_lr"]

    def loss(shift):
        lam = {**lam0, "log_lr": lam0["log_lr"] + shift}
        return float(objective(dyn.run(lam), lam))

    assert float(grad) == pytest.approx((loss(0.01) - loss(-0.01)) / 0.02, rel=5e-3)


def test_distill_beats_ten_random_real_images(tmp_path, capsys):
    result, _, rows, _ = run_tiny(tmp_path, capsys, "distill")
    assert result["val_loss_distilled"] < result["val_loss_random_real"]
    assert result["test_accuracy_distilled"] > result["test_accuracy_random_real"]
    assert (tmp_path / "distill" / "distilled_images.npy").is_file()


def test_l2_per_weight_improves_on_the_best_shared_strength(tmp_path, capsys):
    result, _, _, _ = run_tiny(tmp_path, capsys, "l2-per-weight")
    assert result["val_loss_per_weight"] < result["val_loss_shared"]
    assert result["hyperparameters"] == 64 * 10
    assert result["l2_min"] < result["best_shared_l2"] < result["l2_max"]


def test_l2_per_weight_by_reversible_learning(tmp_path, capsys):
    result, config, _, _ = run_tiny(tmp_path, capsys, "l2-per-weight", "--method", "reversible")
    assert config["method"] == "reversible"
    assert result["val_loss_per_weight"] < result["val_loss_shared"]


def test_resnet_beats_its_hand_set_hyperparameters(tmp_path, capsys):
    result, config, rows, out = run_tiny(tmp_path, capsys, "resnet")
    assert config["method"] == "checkpoint" and len(rows) == result["hyper_steps"] == config["hyper_steps"]
    assert result["val_loss_tuned"] < result["val_loss_hand_set"]
    assert result["test_error_tuned"] <= result["test_error_hand_set"]
    assert result["groups"] == ["stem", "block0", "head"] and len(result["lr_scale_end"]) == 3
    assert result["lr_scale_end"] != pytest.approx([1.0] * 3)  # the per-layer multipliers moved
    lo, hi = config["aug_bounds"]
    assert lo <= result["aug_end"] <= hi and result["aug_end"] != pytest.approx(result["aug_start"])
    assert {"lr_scale_stem", "wd", "aug"} <= set(rows[0])
    assert "resnet.png" in result["plots"] and "hand-set" in out.err


def test_resnet_weights_are_one_tree_per_group_with_decay_on_the_kernels_only():
    """With a zero gradient, one AdamW step is the decay alone: w − lr·scale_g·wd·w on the
    convolution and dense kernels of group g, nothing on BatchNorm's scale and shift or the bias."""
    params, state = resnet.init(jax.random.key(0), 4, 2, 10)
    names = resnet.groups(2)
    assert set(params) == set(names) and set(state) == set(names) - {"head"}
    opt = resnet.adamw(names, clip=1.0)
    hparams = {"learning_rate": 0.1, "weight_decay": 0.5, "group_scale": jnp.arange(1.0, 1.0 + len(names))}
    new, _ = opt.rule(jax.tree.map(jnp.zeros_like, params), opt.init(params), params, hparams)
    kernels = 0
    for g, name in enumerate(names):
        for w, w1 in zip(jax.tree.leaves(params[name]), jax.tree.leaves(new[name])):
            kernels += w.ndim >= 2
            expected = w * (1 - 0.1 * (g + 1) * 0.5) if w.ndim >= 2 else w
            np.testing.assert_allclose(np.asarray(w1), np.asarray(expected), rtol=1e-6, atol=1e-7)
    assert kernels == 1 + 2 * 2 + 1  # the stem, two per block, the head


def test_resnet_augmentation_is_a_smooth_mix_with_a_flipped_shifted_copy():
    x = jax.random.uniform(jax.random.key(0), (5, 64))
    key = jax.random.key(1)
    np.testing.assert_array_equal(resnet.augment(x, 0.0, key, (8, 8)), x)
    full = resnet.augment(x, 1.0, key, (8, 8))
    for image, moved in zip(np.asarray(x).reshape(5, 8, 8), np.asarray(full).reshape(5, 8, 8)):
        padded = np.pad(image, 1)
        copies = [c for dy in range(3) for dx in range(3) for c in (padded[dy:dy + 8, dx:dx + 8],
                                                                    padded[dy:dy + 8, dx:dx + 8][:, ::-1])]
        assert any(np.allclose(moved, c) for c in copies)
    half = resnet.augment(x, 0.5, key, (8, 8))
    np.testing.assert_allclose(half, 0.5 * (x + full), rtol=1e-6)
    slope = jax.grad(lambda m: jnp.sum(resnet.augment(x, m, key, (8, 8)) ** 2))(0.3)
    assert np.isfinite(slope) and slope != 0


def test_resnet_compare_problem_starts_at_the_hand_set_run_and_scores_its_state():
    pytest.importorskip("optuna")
    from hypergradient.apps.compare import problem as compare_problem
    from hypergradient.apps.compare.clock import Run
    from hypergradient.apps.compare.runners import score_choice
    from hypergradient.apps.compare.space import lam_centre

    config = resnet.tiny().resolved()
    data = datasets.load(config.dataset, n_train=config.n_train, n_val=config.n_val, n_test=config.n_test)
    exp = resnet.Resnet(config, data)
    hand_set = exp.scores(exp.train(exp.lam0))
    many = compare_problem.resnet_problems("digits", None, True, ["many"])["many"]
    centre = lam_centre(many.space)
    assert {k: v.shape for k, v in centre.items()} == {k: v.shape for k, v in exp.lam0.items()}
    run = Run("random", "many", config.seed, [(0.0, 0.0)], {k: np.asarray(v) for k, v in centre.items()}, 1)
    score_choice(many, run)  # the validation objective and the test error at s_T, running statistics included
    assert run.val_loss == pytest.approx(hand_set["val_loss"], rel=1e-4)
    assert run.test_error == pytest.approx(hand_set["test_error"])


@pytest.mark.parametrize("name", [n for n in experiments.names() if "reversible" in experiments.get(n).METHODS])
def test_reversible_is_offered_only_where_the_optimizer_declares_its_reversal(name, monkeypatch):
    module = experiments.get(name)
    monkeypatch.setattr(runner, "run", lambda experiment, *args: experiment)
    experiment = module.run(module.tiny(), "unused")
    config = dataclasses.replace(module.tiny(), method="reversible").resolved()
    data = datasets.load(config.dataset, n_train=config.n_train, n_val=config.n_val, n_test=config.n_test)
    assert experiment(config, data).dynamics.optimizer.reversal is not None


def test_a_resumed_run_says_from_which_hyper_step(tmp_path, capsys):
    run_tiny(tmp_path, capsys, "l2-per-weight", "--hyper-steps", "3")
    result, _, rows, captured = run_tiny(tmp_path, capsys, "l2-per-weight", "--hyper-steps", "5")
    assert "resuming optimize from its checkpoint: 3 of 5 hyper-steps done" in captured.err
    assert len(rows) == result["hyper_steps"] == 5


def test_realtime_with_more_hyper_steps_starts_afresh(tmp_path, capsys):
    run_tiny(tmp_path, capsys, "realtime", "--hyper-steps", "2")
    result, _, _, captured = run_tiny(tmp_path, capsys, "realtime", "--hyper-steps", "3")  # a longer training run
    assert "starting afresh" in captured.err and result["hyper_updates"] == 3


def test_the_summary_says_which_hyper_step_is_selected_and_its_value(tmp_path, capsys):
    result, _, rows, captured = run_tiny(tmp_path, capsys, "l2-per-weight")
    values = [float(r["value"]) for r in rows]
    step, value = result["selected_hyper_step"], result["selected_value"]
    assert 0 <= step <= len(values) and value <= min(values)  # the lowest seen, the final λ included
    if step < len(values):
        assert value == pytest.approx(values[step], rel=1e-6)
    assert f"selected the λ of hyper-step {step}" in captured.err
    assert re.search(rf"selected_hyper_step +{step}\n", captured.out)
    assert re.search(r"selected_value +\d", captured.out)


def test_the_learning_curve_marks_the_selected_hyper_step(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plots, "savefig", lambda fig, path: drawn.setdefault("fig", fig))
    tuned = runner.Tuned("optimize", None, None, {"value": [0.9, 0.5, 0.2, 0.4]}, 2, 0.2, "")
    plots.learning_curve(tmp_path, tuned, 1.0, "tuned", "baseline")
    (ax,) = drawn["fig"].axes
    (mark,) = [line for line in ax.get_lines() if line.get_label() == "selected: hyper-step 2"]
    assert list(mark.get_xdata()) == [2] and list(mark.get_ydata()) == [0.2]
    assert "selected: hyper-step 2" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_every_experiment_has_a_tiny_config_a_description_and_methods():
    for name in experiments.names():
        module = experiments.get(name)
        assert name in experiments.DESCRIPTIONS
        assert module.METHODS and module.NAME == name
        tiny = module.tiny("digits").resolved()
        full = module.Config().resolved()
        assert tiny.hyper_steps <= full.hyper_steps
        assert full.dataset == experiments.datasets_of(module)[0]  # digits, or the experiment's own data
        paper = module.Config(dataset="fashion-mnist").resolved()
        assert paper.n_train >= full.n_train  # paper scale on the IDX datasets


@pytest.mark.parametrize("dataset", datasets.DATASETS)
def test_every_field_left_none_has_the_datasets_value(dataset):
    for name in experiments.names():
        config = experiments.get(name).Config(dataset=dataset).resolved()
        unset = {k for k, v in dataclasses.asdict(config).items() if v is None}
        assert unset <= {"data_dir", "n_test"}, (name, unset)  # n_test None: the examples left
        assert isinstance(config, runner.Config)
