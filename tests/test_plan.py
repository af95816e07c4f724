"""hg.plan, hg.Auto and multi-level checkpointing: memory predicted from the compiled program,
the exact hypergradient within a budget, nested segments equal to plain Reverse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergradient as hg
from hypergradient.apps import cli
from problems import mlp_problem, ridge_problem

T = 37  # no level below divides it: every level has a remainder segment


def assert_tree_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * float(np.max(np.abs(y))))


def nesterov_mlp(steps=T):
    """The MLP problem with an optimizer that has no exact inverse, so that every exact method Auto
    can choose is a form of Reverse (Reversible's fixed point would differ from it at 1e-11)."""
    return mlp_problem(steps=steps, optimizer=hg.optim.nesterov())


@pytest.mark.slow
@pytest.mark.parametrize("levels", [(10, 3), (12, 5, 2), (40, 7), (36, 35, 1)], ids=str)
def test_multilevel_checkpointing_equals_reverse(levels):
    dyn, objective, lam = mlp_problem(steps=T)
    reference = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    res = hg.hypergrad(dyn, objective, lam, hg.Reverse(checkpoint_every=levels))
    assert_tree_close(res.grad, reference.grad, rtol=1e-10)
    assert_tree_close(res.params, reference.params, rtol=1e-13)
    np.testing.assert_allclose(res.stats["backward_growth"], reference.stats["backward_growth"], rtol=1e-10)


def test_levels_must_decrease():
    for bad in ((3, 5), (4, 4), (4, 0), (), (2.0,)):
        with pytest.raises(ValueError, match="strictly decreasing"):
            hg.Reverse(checkpoint_every=bad)


def wide_regression(steps=400, width=256):
    """Least squares on 256 weights by Nesterov momentum with a per-step learning rate: a state
    large next to λ, where nested levels of checkpoints take less memory than one level."""
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(64, width))), jnp.asarray(rng.normal(size=64))
    dyn = hg.Dynamics(jnp.zeros(width), lambda w, lam, b: jnp.mean((b[0] @ w - b[1]) ** 2), hg.optim.nesterov(),
                      lambda lam, t: {"lr": lam["lr"][t], "momentum": 0.5}, (x, y), steps)
    return dyn, lambda w, lam: jnp.sum(w**2), {"lr": jnp.full(steps, 0.01)}


#: How far plan's predictions may be from the program that runs (predicted / measured), by kind:
#: Reverse is fitted exactly in T; Truncated, Forward, Reversible and DrMAD are their own short
#: programs; checkpointing is a law, and low (the segments keep more than it counts).
TOLERANCE = {"reverse": (0.95, 1.05), "short": (0.85, 1.15), "checkpointed": (0.5, 1.1)}


def kind(method):
    if isinstance(method, hg.Reverse):
        return "checkpointed" if method.levels else "reverse"
    return "short"


@pytest.mark.slow
def test_predicted_memory_against_the_programs_that_run():
    dyn, objective, lam = mlp_problem(steps=T)
    p = hg.plan(dyn, objective, lam)
    assert {type(r.method) for r in p.rows} >= {hg.Reverse, hg.Truncated, hg.DrMAD, hg.Reversible}
    for row in p.rows:
        measured = hg.hypergrad(dyn, objective, lam, row.method).stats["temp_bytes"]
        low, high = TOLERANCE[kind(row.method)]
        assert low <= row.bytes / measured <= high, (row.method, row.bytes, measured)
        assert row.seconds > 0 and not row.measured
    bytes_of = {r.method: r.bytes for r in p.rows}
    assert bytes_of[hg.Reverse(checkpoint_every=6)] < bytes_of[hg.Reverse()]
    assert 0 < p.objective_bytes < bytes_of[hg.Reverse()]


def test_reverse_is_predicted_at_a_long_horizon():
    dyn, objective, lam = wide_regression(steps=400)
    predicted = next(r.bytes for r in hg.plan(dyn, objective, lam).rows if r.method == hg.Reverse())
    measured = hg.hypergrad(dyn, objective, lam, hg.Reverse()).stats["temp_bytes"]
    assert 0.95 <= predicted / measured <= 1.05, (predicted, measured)


@pytest.mark.slow
def test_plan_compiles_a_few_short_programs_whatever_the_candidates(monkeypatch):
    """The cost of planning: a fixed handful of compiles (none at full length without a budget),
    where compiling every candidate took one per row; under a budget, the choice's own program,
    which the run then reuses."""
    from hypergradient import planning

    short, full = [], []
    compile_all, compiled = planning._compile_all, planning.compiled
    monkeypatch.setattr(planning, "_compile_all", lambda programs: short.extend(programs) or compile_all(programs))
    monkeypatch.setattr(planning, "compiled", lambda *a: full.append(a[2]) or compiled(*a))
    dyn, objective, lam = mlp_problem(steps=T)
    p = hg.plan(dyn, objective, lam)
    assert len(short) == 6 < len(p.rows) and not full  # Reverse twice each way, Reversible and the objective
    budget = p.rows[0].bytes * 2  # Reverse fits
    chosen = hg.plan(dyn, objective, lam, memory_budget=budget)
    assert full == [hg.Reverse()] and chosen.rows[0].measured
    res = hg.hypergrad(dyn, objective, lam, chosen.choice)
    assert res.stats["compile_seconds"] == 0.0  # the run reused the plan's program


@pytest.mark.slow
def test_plan_table_and_choice():
    dyn, objective, lam = ridge_problem(steps=T)
    p = hg.plan(dyn, objective, lam)
    assert p.choice == hg.Forward()  # two hyperparameters: as fast as Reverse, less memory
    text = str(p)
    assert f"plan for {T} steps, 2 hyperparameters, no memory budget" in text
    assert "Forward()" in text and "DrMAD()" in text and "choice: Forward()" in text
    assert "the objective's gradient alone" in text and p.objective_bytes > 0 and p.seconds > 0
    big = hg.plan(*mlp_problem(steps=T))
    assert big.choice == hg.Reverse() and hg.Forward() not in [r.method for r in big.rows]  # m = 204


@pytest.mark.slow
def test_auto_under_a_budget_is_exact_and_fits():
    dyn, objective, lam = nesterov_mlp()
    reference = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    budget = reference.stats["temp_bytes"] - 1
    res = hg.hypergrad(dyn, objective, lam, hg.Auto(memory_budget=budget))
    assert res.stats["method"].startswith("Reverse(checkpoint_every=")
    assert res.stats["temp_bytes"] <= budget
    assert_tree_close(res.grad, reference.grad, rtol=1e-8)


def test_auto_picks_nested_levels_when_the_budget_asks():
    dyn, objective, lam = wide_regression()
    rows = hg.plan(dyn, objective, lam).rows
    one_level = min(r.bytes for r in rows if len(getattr(r.method, "levels", ())) == 1)
    nested = min(r.bytes for r in rows if len(getattr(r.method, "levels", ())) > 1)
    assert nested < one_level
    res = hg.hypergrad(dyn, objective, lam, hg.Auto(memory_budget=one_level - 1))
    chosen = next(r.method for r in rows if repr(r.method) == res.stats["method"])
    assert len(chosen.levels) > 1
    assert res.stats["temp_bytes"] < one_level
    assert_tree_close(res.grad, hg.hypergrad(dyn, objective, lam, hg.Reverse()).grad, rtol=1e-8)


@pytest.mark.slow
def test_auto_is_traceable():
    dyn, objective, lam = nesterov_mlp()
    budget = hg.hypergrad(dyn, objective, lam, hg.Reverse()).stats["temp_bytes"] - 1
    sol = jax.jit(lambda lam: hg.value_and_grad(dyn, objective, lam, hg.Auto(budget)))(lam)
    assert_tree_close(sol.grad, hg.hypergrad(dyn, objective, lam).grad, rtol=1e-8)


def test_a_budget_nothing_fits_is_a_clear_error():
    dyn, objective, lam = ridge_problem(steps=T)
    with pytest.raises(hg.MethodError, match=r"no exact method fits a memory budget of 100 bytes .* hg.DrMAD\(\)"):
        hg.hypergrad(dyn, objective, lam, hg.Auto(memory_budget=100))
    p = hg.plan(dyn, objective, lam, memory_budget=100)
    assert p.choice is None and "no exact method fits" in str(p) and "over budget" in str(p)
    with pytest.raises(ValueError, match="memory_budget"):
        hg.Auto(memory_budget=0)


@pytest.mark.slow
def test_cli_plan_prints_the_table(capsys):
    assert cli.main(["plan", "l2-per-weight", "--tiny", "--memory-budget", "1000000"]) == 0
    out = capsys.readouterr().out
    assert "plan for 30 steps" in out and "memory budget 976.6 KiB" in out and "choice: Reverse(" in out
