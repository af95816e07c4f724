"""hg.optimize: the offline driver (a full training run per hyper-step)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergradient as hg
from hypergradient.drivers.checkpoint import CheckpointMismatchError
from hypergradient.drivers.offline import HyperDivergenceError, optimize
from problems import mlp_problem, ridge_data, ridge_problem

jax.config.update("jax_enable_x64", True)

HERE = os.path.dirname(os.path.abspath(__file__))


def ridge_l2_problem(steps=200, lr=0.3, seed=0):
    """Ridge regression (n=20, d=8) whose validation optimum is an interior L2 strength.

    Full-batch GD with a fixed learning rate; ``steps`` is enough to converge
    to the ridge solution near the optimum, so the grid can use the closed form.
    """
    x, y, xv, yv = ridge_data(n=20, nv=40, d=8, seed=seed)

    def loss(w, lam, batch):
        bx, by = batch
        return jnp.mean((bx @ w - by) ** 2) + jnp.exp(lam["log_l2"]) * jnp.sum(w**2)

    dyn = hg.Dynamics(
        init=jnp.zeros(x.shape[1]),
        loss=loss,
        optimizer=hg.optim.sgd(),
        optimizer_hparams=lambda lam, t: {"lr": lr},
        data=(jnp.asarray(x), jnp.asarray(y)),
        steps=steps,
    )

    def objective(w, lam):
        return jnp.mean((xv @ w - yv) ** 2)

    def closed_form(log_l2):
        c = np.exp(log_l2)
        w = np.linalg.solve(x.T @ x / len(y) + c * np.eye(x.shape[1]), x.T @ y / len(y))
        return np.mean((xv @ w - yv) ** 2)

    return dyn, objective, closed_form


def test_finds_the_l2_strength_of_a_fine_grid_search():
    dyn, objective, closed_form = ridge_l2_problem()
    grid = np.linspace(-8.0, 3.0, 4401)  # spacing 0.0025
    values = np.array([closed_form(g) for g in grid])
    best = grid[np.argmin(values)]
    assert -7 < best < 2  # interior: the test means something
    res = optimize(dyn, objective, {"log_l2": -5.0}, hyper_optimizer=optax.adam(0.1), hyper_steps=150)
    assert abs(float(res.hparams["log_l2"]) - best) < 0.01
    assert res.value <= values.min() + 1e-8
    # the history: one row per hyper-step; the objective went down
    assert res.steps == 150 and not res.stopped
    for key in ("value", "grad_norm", "seconds"):
        assert res.history[key].shape == (150,)
    assert res.history["hparams"]["log_l2"].shape == (150,)
    assert res.history["hparams"]["log_l2"][0] == -5.0
    assert res.history["value"][-1] < res.history["value"][0]
    # params are w_T of the returned hparams, value the objective there
    np.testing.assert_array_equal(np.asarray(res.params), np.asarray(dyn.run(res.hparams)))
    assert res.value == float(objective(res.params, res.hparams))


def test_resume_in_process_equals_uninterrupted(tmp_path):
    dyn, objective, lam = ridge_problem(steps=20)
    full = optimize(dyn, objective, lam, hyper_optimizer=optax.adam(0.05), hyper_steps=6)
    first = optimize(dyn, objective, lam, hyper_optimizer=optax.adam(0.05), hyper_steps=3, checkpoint_dir=tmp_path)
    assert first.steps == 3
    rest = optimize(dyn, objective, lam, hyper_optimizer=optax.adam(0.05), hyper_steps=6, checkpoint_dir=tmp_path)
    assert rest.steps == 6
    for k in lam:
        assert float(rest.hparams[k]) == float(full.hparams[k])
    np.testing.assert_array_equal(rest.history["value"], full.history["value"])
    np.testing.assert_array_equal(rest.history["hparams"]["lr"], full.history["hparams"]["lr"])
    # a finished run called again does nothing more and returns the same
    again = optimize(dyn, objective, lam, hyper_optimizer=optax.adam(0.05), hyper_steps=6, checkpoint_dir=tmp_path)
    assert again.steps == 6 and float(again.hparams["lr"]) == float(full.hparams["lr"])
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import optax
    from hypergradient.drivers import checkpoint
    from hypergradient.drivers.offline import optimize
    checkpoint.CHECKPOINT_SECONDS = 0.0  # a write after every hyper-step, so the kill finds one to resume
    from problems import ridge_problem

    kill_at = int(sys.argv[2])
    def callback(step, hparams, value, grad):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    dyn, objective, lam = ridge_problem(steps=10)
    res = optimize(dyn, objective, lam, hyper_optimizer=optax.adam(0.03), hyper_steps=8,
                   callback=callback, checkpoint_dir=sys.argv[1])
    print(json.dumps({
        "hparams": [float(x).hex() for l in jax.tree.leaves(res.hparams) for x in l.ravel()],
        "values": [float(v).hex() for v in res.history["value"]],
        "value": float(res.value).hex(),
    }))
    """
)


def run_child(script, ckpt_dir, kill_at):
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, str(script), str(ckpt_dir), str(kill_at)],
        capture_output=True, text=True, env=env, cwd=HERE, timeout=300,
    )


@pytest.mark.slow
def test_kill_9_and_resume_gives_the_uninterrupted_result(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    killed = run_child(script, tmp_path / "a", kill_at=5)
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "a" / "optimize").is_dir()
    resumed = run_child(script, tmp_path / "a", kill_at=-1)
    assert resumed.returncode == 0, resumed.stderr
    reference = run_child(script, tmp_path / "b", kill_at=-1)
    assert reference.returncode == 0, reference.stderr
    assert json.loads(resumed.stdout) == json.loads(reference.stdout)  # bitwise


def test_refuses_a_checkpoint_of_another_problem(tmp_path):
    dyn, objective, lam = ridge_problem(steps=10)
    optimize(dyn, objective, lam, hyper_steps=2, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match="different problem"):  # other λ structure
        optimize(dyn, objective, {"log_l2": lam["log_l2"], "lr": lam["lr"], "x": jnp.zeros(())},
                 hyper_steps=3, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match="different problem"):  # other λ shapes
        optimize(dyn, objective, {"log_l2": jnp.full(2, -1.0), "lr": lam["lr"]}, hyper_steps=3,
                 checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match="train_steps"):  # another training run
        dyn11, _, _ = ridge_problem(steps=11)
        optimize(dyn11, objective, lam, hyper_steps=3, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match="another hyper-optimizer"):
        optimize(dyn, objective, lam, hyper_optimizer=optax.sgd(0.1, momentum=0.9), hyper_steps=3,
                 checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match="other initial hyperparameters"):  # another λ0
        optimize(dyn, objective, {**lam, "lr": jnp.asarray(0.2)}, hyper_steps=3, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match="another hyper-optimizer"):  # another hyper lr
        optimize(dyn, objective, lam, hyper_optimizer=optax.adam(0.02), hyper_steps=3, checkpoint_dir=tmp_path)
    resumed = optimize(dyn, objective, lam, hyper_optimizer=optax.adam(1e-2), hyper_steps=3, checkpoint_dir=tmp_path)
    assert resumed.steps == 3  # an equal hyper-optimizer written again resumes
    for step in (tmp_path / "optimize").iterdir():  # damage every stored step
        for f in step.rglob("*"):
            if f.is_file():
                f.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="not a readable"):
        optimize(dyn, objective, lam, hyper_steps=3, checkpoint_dir=tmp_path)


def push_lr(amount):
    """A 'hyper-optimizer' that adds ``amount`` to λ['lr'] at every step, whatever the gradient."""

    def update(updates, state, params=None):
        return jax.tree.map(jnp.zeros_like, updates) | {"lr": jnp.full_like(updates["lr"], amount)}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def test_divergence_names_the_hyper_step_and_the_training_step(tmp_path):
    dyn, objective, lam = ridge_problem(steps=200)  # lr 0.1 is stable; 50.1 overflows within 200 steps
    with pytest.raises(HyperDivergenceError) as info:
        optimize(dyn, objective, lam, hyper_optimizer=push_lr(50.0), hyper_steps=5, checkpoint_dir=tmp_path)
    err = info.value
    assert isinstance(err, hg.DivergenceError)
    assert err.hyper_step == 1 and err.step is not None and 0 < err.step < 200
    msg = str(err)
    assert "hyper-step 1" in msg and f"training step {err.step}" in msg
    assert "smaller hyper learning rate" in msg and "constraint" in msg
    assert float(err.hparams["lr"]) == float(lam["lr"])  # the last good λ: hyper-step 0's
    assert err.history["value"].shape == (1,)


def test_callback_sees_every_step_and_can_stop():
    dyn, objective, lam = ridge_problem(steps=10)
    seen = []

    def callback(step, hparams, value, grad):
        seen.append((step, float(hparams["lr"]), value, float(grad["lr"])))
        return step == 3

    res = optimize(dyn, objective, lam, hyper_optimizer=optax.adam(0.05), hyper_steps=10, callback=callback)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert res.stopped and res.steps == 4
    assert float(res.hparams["lr"]) == seen[-1][1]  # stopped before applying step 3's update
    np.testing.assert_array_equal(res.history["value"], [s[2] for s in seen])
    res_val = hg.hypergrad(dyn, objective, res.hparams)
    assert float(res_val.grad["lr"]) == seen[-1][3]


def test_constraint_is_applied_after_every_step():
    dyn, objective, lam = ridge_problem(steps=10)

    def cap_lr(lam):
        return {**lam, "lr": jnp.clip(lam["lr"], 0.0, 0.12)}

    res = optimize(dyn, objective, lam, hyper_optimizer=push_lr(0.01), hyper_steps=5, constraint=cap_lr)
    np.testing.assert_allclose(res.history["hparams"]["lr"], [0.1, 0.11, 0.12, 0.12, 0.12], rtol=1e-12)
    assert float(res.hparams["lr"]) == 0.12


def test_constraints_module_projection():
    constraints = pytest.importorskip("hypergradient.constraints")
    dyn, objective, lam = ridge_problem(steps=10)
    res = optimize(dyn, objective, lam, hyper_optimizer=push_lr(0.01), hyper_steps=4,
                   constraint=constraints.box(0.0, 0.115, on="lr"))
    np.testing.assert_allclose(res.history["hparams"]["lr"], [0.1, 0.11, 0.115, 0.115], rtol=1e-12)
    assert float(res.hparams["log_l2"]) == float(lam["log_l2"])


def test_progress_bar_shows_the_objective(capsys):
    dyn, objective, lam = ridge_problem(steps=10)
    optimize(dyn, objective, lam, hyper_steps=2, progress=True)
    assert "objective=" in capsys.readouterr().err
    optimize(dyn, objective, lam, hyper_steps=2)  # auto: not a terminal, so a line every 10 s at most
    assert capsys.readouterr().err == ""
    optimize(dyn, objective, lam, hyper_steps=3, progress=hg.TextProgressMeter(every_seconds=0))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and lines[-1].startswith("hyper-steps 3/3: objective ") and "s left" in lines[-1]


def test_rejects_bad_arguments():
    dyn, objective, lam = ridge_problem(steps=10)
    with pytest.raises(ValueError, match="hyper_steps"):
        optimize(dyn, objective, lam, hyper_steps=-1)
    with pytest.raises(TypeError, match="floating point"):
        optimize(dyn, objective, {"log_l2": 1, "lr": 0.1}, hyper_steps=1)
    with pytest.raises(TypeError, match="optax"):
        optimize(dyn, objective, lam, hyper_optimizer=0.1, hyper_steps=1)
    zero = optimize(dyn, objective, lam, hyper_steps=0)
    assert zero.steps == 0 and zero.history["value"].shape == (0,)


def test_a_second_call_with_the_same_objects_traces_nothing():
    dyn, objective, _ = ridge_l2_problem(steps=20)
    traces = []

    def counted(w, lam):
        traces.append("objective")
        return objective(w, lam)

    def box(lam):
        traces.append("constraint")
        return {"log_l2": jnp.clip(lam["log_l2"], -10.0, 2.0)}

    lam = {"log_l2": jnp.asarray(-3.0)}
    opt = optax.adam(0.1)
    first = optimize(dyn, counted, lam, hyper_optimizer=opt, hyper_steps=3, constraint=box)
    n = len(traces)
    traces.clear()
    second = optimize(dyn, counted, lam, hyper_optimizer=opt, hyper_steps=3, constraint=box)
    assert traces == ["constraint"]  # check_common projects λ once, eagerly; nothing is traced again
    assert n > 1
    assert second.value == first.value
    np.testing.assert_array_equal(second.history["value"], first.history["value"])


def test_best_hyperparameters_are_the_lowest_objective_seen():
    dyn, objective, lam = ridge_problem(steps=10)
    res = optimize(dyn, objective, lam, hyper_optimizer=push_lr(0.05), hyper_steps=8)  # goes past the best lr
    seen = list(res.history["value"]) + [res.value]
    assert res.best_value == min(seen) and res.best_step == int(np.argmin(seen))
    assert res.best_value < res.value  # the last λ is not the best here
    np.testing.assert_allclose(float(hg.hypergrad(dyn, objective, res.best_hparams).value), res.best_value, rtol=1e-12)


def test_divergence_at_lambda0_says_so_not_the_hyper_learning_rate():
    dyn, objective, lam = ridge_problem(steps=10)
    with pytest.raises(HyperDivergenceError, match="diverges at the initial hyperparameters") as info:
        optimize(dyn, objective, {**lam, "lr": jnp.asarray(1e40)}, hyper_steps=3)
    assert "hyper learning rate is not the cause" in str(info.value)


def test_a_population_of_runs_equals_the_runs_one_by_one():
    dyn, objective, lam = ridge_problem(steps=10)
    scales = jnp.asarray([0.5, 1.0, 2.0])
    members = [{"log_l2": lam["log_l2"] + s, "lr": lam["lr"] * s} for s in scales]
    population = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
    opt = optax.adam(0.05)
    res = optimize(dyn, objective, population, hyper_optimizer=opt, hyper_steps=4, population_axis=0, progress=False)
    alone = [optimize(dyn, objective, m, hyper_optimizer=opt, hyper_steps=4, progress=False) for m in members]
    np.testing.assert_allclose(res.population_values, [a.value for a in alone], rtol=1e-10)
    best = int(np.argmin([a.value for a in alone]))
    for k in lam:
        np.testing.assert_allclose(np.asarray(res.hparams[k]), np.asarray(alone[best].hparams[k]), rtol=1e-10)
    assert res.value == pytest.approx(alone[best].value, rel=1e-10)
    assert res.history["value"].shape == (4, 3)
    np.testing.assert_allclose(res.history["value"][:, 1], alone[1].history["value"], rtol=1e-10)
    assert res.best_value == pytest.approx(min(min(a.best_value for a in alone), res.best_value))


def test_a_population_member_that_diverges_is_held_not_fatal(tmp_path):
    dyn, objective, lam = ridge_problem(steps=10)
    population = {"log_l2": jnp.stack([lam["log_l2"]] * 2), "lr": jnp.asarray([0.1, 1e40])}
    res = optimize(dyn, objective, population, hyper_steps=3, population_axis=0, checkpoint_dir=tmp_path,
                   progress=False)
    assert np.isinf(res.history["value"][:, 1]).all() and np.isfinite(res.history["value"][:, 0]).all()
    assert float(res.hparams["lr"]) != 1e40 and np.isinf(res.population_values[1])
    again = optimize(dyn, objective, population, hyper_steps=5, population_axis=0, checkpoint_dir=tmp_path,
                     progress=False)  # resumes from hyper-step 3
    assert again.history["value"].shape == (5, 2)


@pytest.mark.slow
def test_a_population_with_reversible_sizes_the_buffer_for_every_member():
    """Momenta 0.95 and 0.2 destroy 0.07 and 2.3 bits per step: the buffer serves the second too,
    and a buffer given too small is refused naming the member, not differentiated wrongly."""
    dyn, objective, lam = mlp_problem(steps=60)
    members = [dict(lam, momentum=jnp.full_like(lam["momentum"], mu)) for mu in (0.95, 0.2)]
    population = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
    opt = optax.sgd(0.01)
    res = optimize(dyn, objective, population, method=hg.Reversible(), hyper_optimizer=opt, hyper_steps=2,
                   population_axis=0, progress=False)
    for i, member in enumerate(members):
        alone = optimize(dyn, objective, member, method=hg.Reversible(), hyper_optimizer=opt, hyper_steps=2,
                         progress=False)
        np.testing.assert_allclose(res.history["value"][:, i], alone.history["value"], rtol=1e-12)
    with pytest.raises(hg.ReversalError, match="population member 1, hyper-step 0: .*buffer overflowed"):
        optimize(dyn, objective, population, method=hg.Reversible(max_bits_per_step=0.25), hyper_optimizer=opt,
                 hyper_steps=2, population_axis=0, progress=False)


def scale_lr(factor):
    """A 'hyper-optimizer' that multiplies λ['lr'] by ``factor`` at every step, whatever the gradient."""

    def update(updates, state, params):
        return jax.tree.map(jnp.zeros_like, updates) | {"lr": (factor - 1) * params["lr"]}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def test_a_divergence_carries_the_best_lambda_seen_before_it():
    dyn, objective, lam = ridge_problem(steps=10)
    with pytest.raises(HyperDivergenceError) as info:
        optimize(dyn, objective, lam, hyper_optimizer=scale_lr(10.0), hyper_steps=40)
    e = info.value
    values = list(e.history["value"])
    assert e.best_step == int(np.argmin(values)) and e.best_value == min(values)
    np.testing.assert_allclose(float(hg.hypergrad(dyn, objective, e.best_hparams).value), e.best_value, rtol=1e-12)


PROBLEM_HEADER = {"driver", "train_steps", "weights", "hparams0", "hyper_optimizer", "constraint", "step"}


@pytest.mark.parametrize("population", [False, True], ids=["optimize", "population"])
def test_the_checkpoint_format_is_fixed(tmp_path, population):
    """The stored trees and header keys of each driver: what a checkpoint written by an earlier
    version holds, and so what a resume may ask of it."""
    from hypergradient.drivers import checkpoint

    dyn, objective, lam = ridge_problem(steps=5)
    if population:
        lam = jax.tree.map(lambda x: jnp.stack([x, x]), lam)
    optimize(dyn, objective, lam, hyper_steps=2, checkpoint_dir=tmp_path, progress=False,
             population_axis=0 if population else None)
    name = "population" if population else "optimize"
    saved = checkpoint.load(tmp_path / name)
    trees = {"hparams", "opt_state", "best_hparams", "history"}
    header = PROBLEM_HEADER | {"best_value", "best_step"}
    if population:
        header |= {"members"}
    else:
        trees |= {"good_hparams", "hparams_trajectory"}
        header |= {"good_step"}
    assert set(saved.specs) == trees and set(saved.header) == header
    assert saved.header["driver"] == name and saved.header["step"] == 2
    assert saved.specs["history"]["keys"] == ["grad_norm", "seconds", "value"]
