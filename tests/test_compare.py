"""`hypergradient compare`: a tiny comparison finishes, writes its files and resumes from its storage.

One module-scoped comparison (digits, tiny schedules, both regimes, every
method, one seed, a one-second budget) serves the checks on its files and
on the hybrid's trials; a second invocation with the same storage and a
larger budget must continue the TPE and hybrid studies. The second call
reuses the first one's compiled programs (they are cached per process), so
it costs about its budget.
"""

from __future__ import annotations

import argparse
import csv

import pytest

optuna = pytest.importorskip("optuna")

from hypergradient.apps import compare  # noqa: E402
from hypergradient.apps.compare.problem import problems  # noqa: E402
from hypergradient.apps.compare.runners import HYBRID_HYPER_STEPS  # noqa: E402
from hypergradient.apps.compare.space import suggest_start  # noqa: E402

pytestmark = pytest.mark.end_to_end  # left to `make test` by the floor leg (Makefile)

BUDGET = 1.0


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hypergradient compare")
    compare.add_arguments(parser)
    return parser.parse_args(list(argv))


def study_trials(storage: str, method: str, regime: str = "few"):
    store = compare.open_storage(storage)
    name = compare.study_name("schedules", "digits", True, regime, method, 0)
    return optuna.load_study(study_name=name, storage=store).get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    storage = str(out / "study.journal")
    args = parse("schedules", "--tiny", "--budget-seconds", str(BUDGET), "--seeds", "1",
                 "--out", str(out), "--storage", storage)
    code = compare.main(args)
    return out, storage, code


def test_tiny_comparison_writes_its_files(first, capsys):
    out, _, code = first
    assert code == 0
    for name in ("trace.csv", "summary.csv", "summary.md", "trace.png"):
        assert (out / name).is_file(), name
    assert (out / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["regime"], r["method"]) for r in rows} == {
        (regime, method) for regime in compare.REGIMES for method in compare.METHODS
    }
    sizes = {r["regime"]: int(r["hyperparameters"]) for r in rows}
    assert sizes == {"few": 3, "many": 2 * 20 * 2 + 2}  # tiny: T = 20, two layers
    for r in rows:
        assert 0.0 < float(r["best_val_loss"]) < 5.0, r
        assert 0.0 <= float(r["test_error"]) <= 1.0, r
    with open(out / "trace.csv") as f:
        trace = list(csv.DictReader(f))
    assert set(trace[0]) == {"method", "regime", "seed", "seconds", "best_val"}
    for regime in compare.REGIMES:
        for method in compare.METHODS:
            points = [(float(p["seconds"]), float(p["best_val"])) for p in trace
                      if p["regime"] == regime and p["method"] == method]
            assert points, (regime, method)
            assert all(0 <= s <= BUDGET for s, _ in points)  # nothing recorded past the budget
            bests = [v for _, v in points]
            assert bests == sorted(bests, reverse=True)  # best so far only improves
    assert "| few | 3 | tpe |" in (out / "summary.md").read_text()


def test_hybrid_trials_run_hypergradient_descent_from_tpe_settings(first):
    out, storage, code = first
    assert code == 0
    with open(out / "summary.csv") as f:
        summary = {(r["regime"], r["method"]): r for r in csv.DictReader(f)}
    for regime in compare.REGIMES:
        problem = problems("schedules", "digits", None, True)[regime]
        dyn = problem.dynamics(0)
        trials = [t for t in study_trials(storage, "hybrid", regime) if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(trials) > 1, regime
        for t in trials:
            values = [v for _, v in t.user_attrs["curve"]]
            assert 0 < len(values) <= HYBRID_HYPER_STEPS + 1 and t.value == min(values)
            # the curve starts at f of the start TPE drew (constant per entry of λ)
            start = problem.programs.evaluate(dyn, suggest_start(optuna.trial.FixedTrial(t.params), problem.space))
            assert values[0] == pytest.approx(start, rel=1e-4), (regime, t.number)
        # hypergradient descent improved on some trial's start, and the run reports the best trial
        assert any(t.value < t.user_attrs["curve"][0][1] for t in trials), regime
        assert float(summary[regime, "hybrid"]["best_val_loss"]) == pytest.approx(min(t.value for t in trials), rel=1e-6)


@pytest.mark.parametrize("method", ["tpe", "hybrid"])
def test_second_invocation_resumes_the_study(first, capsys, method):
    out, storage, code = first
    assert code == 0
    before = study_trials(storage, method)
    assert before and max(t.user_attrs["elapsed"] for t in before) >= BUDGET
    args = parse("schedules", "--tiny", "--regime", "few", "--methods", method, "--budget-seconds",
                 str(2 * BUDGET), "--out", str(out), "--storage", storage)
    assert compare.main(args) == 0
    after = study_trials(storage, method)
    assert len(after) > len(before)
    # The earlier trials are kept as they were, and the new ones come after them in time.
    old = {t.number: t for t in after[: len(before)]}
    for t in before:
        assert old[t.number].params == t.params and old[t.number].value == t.value
    start = max(t.user_attrs["elapsed"] for t in before)
    assert all(t.user_attrs["elapsed"] > start for t in after[len(before):])
    printed = capsys.readouterr()
    assert f"{len(before)} trials from storage" in printed.err
    assert f"| few | 3 | {method} |" in printed.out


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        parse("schedules", "--methods", "grid")
    with pytest.raises(SystemExit):
        parse("schedules", "--budget-seconds", "0")
    args = parse("schedules")
    assert args.regime == "both" and args.methods == compare.METHODS and args.seeds == 1
