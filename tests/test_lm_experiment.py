"""`hypergradient run lm` and `compare lm`: the transformer LM tuned end to end, in its tiny
configuration; its text splits; the datasets each experiment reads.

The tiny run is shared by the module (one compile). The transformer's own derivatives are checked
against finite differences in tests/test_transformer.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hypergradient.apps import lm, text
from hypergradient.apps.cli import main
from hypergradient.apps.experiments import language_model

pytestmark = pytest.mark.end_to_end  # left to `make test` by the floor leg (Makefile)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    code = main(["run", "lm", "--tiny", "--no-progress", "--out", str(out)])
    return code, out


def test_tiny_run_beats_the_defaults_on_validation_and_writes_its_folder(tiny_run):
    code, out = tiny_run
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "text" and result["python"] == text.python_version()
    assert result["val_loss_tuned"] < result["val_loss_default"] - 0.05  # measured: 5.23 against 5.52
    assert result["sources"] == list(text.STDLIB_PACKAGES)
    weights = np.array(result["source_weights_tuned"])
    assert weights.mean() == pytest.approx(1.0) and np.ptp(weights) > 0  # the per-source weights moved
    tiny = language_model.tiny()
    assert tiny.peak_bounds[0] <= result["peak_lr_tuned"] <= tiny.peak_bounds[1]
    assert (out / "lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "history.csv").read_text().splitlines()) == 1 + tiny.hyper_steps


def test_the_defaults_score_the_same_in_run_and_in_compare():
    """compare lm's gradient methods start at the centre of its box: the experiment's defaults."""
    pytest.importorskip("optuna")
    from hypergradient.apps.compare import problem as compare_problem
    from hypergradient.apps.compare.clock import Run
    from hypergradient.apps.compare.runners import score_choice
    from hypergradient.apps.compare.space import lam_centre

    config = language_model.tiny().resolved()
    exp = language_model.LanguageModel(config, language_model.load(config))
    defaults = exp.baseline()
    many = compare_problem.lm_problems("text", None, True, ["many"])["many"]
    centre = lam_centre(many.space)
    assert set(centre) == set(exp.lam0)
    for k in centre:
        np.testing.assert_allclose(centre[k], exp.lam0[k], rtol=1e-6, atol=1e-7)
    run = Run("random", "many", config.seed, [(0.0, 0.0)], {k: np.asarray(v) for k, v in centre.items()}, 1)
    score_choice(many, run)
    assert run.val_loss == pytest.approx(defaults["val_loss"], rel=1e-5)
    assert run.test_loss == pytest.approx(defaults["test_loss"], rel=1e-5)
    assert run.test_error == pytest.approx(defaults["test_error"])


def test_source_weights_have_mean_one_and_equal_logits_weigh_every_window_one():
    np.testing.assert_allclose(lm.source_weights({"source_logits": np.zeros(4)}), np.ones(4))
    w = lm.source_weights({"source_logits": np.array([0.0, np.log(3.0)])})
    np.testing.assert_allclose(w, [0.5, 1.5])


def test_splits_cut_each_source_into_disjoint_consecutive_stretches():
    sources = {"a": bytes(range(100)), "b": bytes(range(100, 200))}
    train, val, test = text.splits(sources, 5, val_fraction=0.2, test_fraction=0.1)
    assert [len(part[0]) for part in (train, val, test)] == [2 * 14, 2 * 4, 2 * 2]  # 70, 20 and 10 bytes each
    np.testing.assert_array_equal(val[0][0], np.arange(70, 75))  # a's validation starts after its 70 training bytes
    np.testing.assert_array_equal(test[0][-1], np.arange(195, 200))  # b's test stretch: its last 10 bytes
    seen = np.concatenate([p[0].ravel() for p in (train, val, test)])
    assert len(np.unique(seen)) == len(seen)  # no byte in two windows
    np.testing.assert_array_equal(train[1], [0] * 14 + [1] * 14)
    np.testing.assert_array_equal(test[1], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="must be positive"):
        text.splits(sources, 5, val_fraction=0.6, test_fraction=0.4)


def test_a_folder_of_text_is_read_and_an_image_dataset_refused(tmp_path, capsys):
    code = main(["run", "lm", "--tiny", "--dataset", "digits", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "experiment 'lm' reads text, not 'digits'" in err and len(err.strip().splitlines()) == 1
    code = main(["run", "schedules", "--tiny", "--dataset", "text", "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert code == 2 and "reads digits, fashion-mnist, mnist, not 'text'" in err
    code = main(["run", "lm", "--tiny", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "z")])
    assert code == 3 and "no text folder" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "xyz")
    for name, size in (("one.txt", 4000), ("two.txt", 3000)):
        (tmp_path / "corpus").mkdir(exist_ok=True)
        (tmp_path / "corpus" / name).write_bytes(bytes(np.random.default_rng(size).integers(97, 123, size, np.uint8)))
    config = language_model.tiny()
    data = language_model.load(language_model.Config(**{**config.__dict__, "data_dir": str(tmp_path / "corpus")}))
    assert data.sources == ("one.txt", "two.txt") and data.python is None
    assert set(np.unique(data.train.y)) == {0, 1} and data.train.x.shape[1] == config.context + 1
