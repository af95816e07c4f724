"""`hypergradient attribute`: the scores, the CSV of the most helpful and harmful examples and their
image grid, end to end on hyper-cleaning's tiny setting, where flipped labels must stand out."""

import csv
import json

import numpy as np
import pytest

from hypergradient.apps import cli, datasets


def test_attribute_writes_scores_csv_and_grid_and_flipped_labels_stand_out(tmp_path, capsys):
    out = tmp_path / "attr"
    assert cli.main(["attribute", "hyper-cleaning", "--tiny", "--top", "8", "--out", str(out)]) == 0
    scores = np.load(out / "scores.npy")
    saved = np.load(out / "scores.npz")
    assert scores.shape == (200,) and np.array_equal(saved["scores"], scores)
    assert np.array_equal(saved["indices"], np.arange(200))
    rows = list(csv.DictReader(open(out / "examples.csv")))
    assert [r["kind"] for r in rows] == ["helpful"] * 8 + ["harmful"] * 8
    for r in rows:
        assert np.isclose(float(r["score"]), scores[int(r["index"])], rtol=1e-6)
    harmful = [float(r["score"]) for r in rows if r["kind"] == "harmful"]
    assert harmful == sorted(harmful, reverse=True) and min(harmful) >= np.sort(scores)[-8]
    assert (out / "examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "result.json").read_text())
    # half the labels are flipped: the most harmful examples are (almost) all flipped ones
    assert result["flipped"] == 100 and result["flipped_among_harmful"] >= 0.75
    assert result["flipped_among_helpful"] <= 0.25 and result["flipped_detection_auc"] > 0.7
    assert "flipped_detection_auc" in capsys.readouterr().out


def test_attribute_refuses_an_experiment_without_per_example_weights(capsys):
    assert cli.main(["attribute", "schedules", "--tiny"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def _fashion_mnist_missing() -> bool:
    try:
        datasets.check("fashion-mnist")
    except (FileNotFoundError, ValueError):
        return True
    return False


@pytest.mark.skipif(_fashion_mnist_missing(), reason="Fashion-MNIST is not installed")
def test_attribute_on_fashion_mnist_finds_flipped_labels_among_the_most_harmful(tmp_path):
    out = tmp_path / "attr"
    assert cli.main(["attribute", "hyper-cleaning", "--dataset", "fashion-mnist", "--tiny", "--top", "8",
                     "--out", str(out)]) == 0
    scores = np.load(out / "scores.npy")
    assert scores.shape == (200,) and np.isfinite(scores).all()
    result = json.loads((out / "result.json").read_text())
    assert result["dataset"] == "fashion-mnist" and result["flipped"] == 100
    # the flipped labels stand out less than on digits, but the most harmful are still mostly flipped
    assert result["flipped_among_harmful"] >= 0.75 and result["flipped_detection_auc"] > 0.6
    rows = list(csv.DictReader(open(out / "examples.csv")))
    labels = [int(r["label"]) for r in rows]
    clean = datasets.load("fashion-mnist", n_train=200, n_val=0, n_test=0).train.y
    for r, label in zip(rows, labels):  # a row's label is the clean one exactly when it was not flipped
        assert (label == clean[int(r["index"])]) == (r["flipped"] == "False")
    assert (out / "examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attribute_names_a_missing_fashion_mnist_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["attribute", "hyper-cleaning", "--dataset", "fashion-mnist", "--data-dir", str(missing),
                     "--tiny", "--out", str(tmp_path / "attr")]) == 3  # bad input
    err = capsys.readouterr().err
    assert "Fashion-MNIST not found" in err and f"{missing} (no such folder)" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "attr").exists()
