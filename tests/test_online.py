"""hg.online: real-time hyperparameter optimization (RTHO, TRHO) in one training run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergradient as hg
from hypergradient.drivers import checkpoint as checkpoint_module
from hypergradient.drivers.checkpoint import CheckpointMismatchError
from hypergradient.drivers.offline import HyperDivergenceError
from hypergradient.drivers.online import online
from hypergradient.dynamics import train
from problems import mlp_problem, ridge_data

jax.config.update("jax_enable_x64", True)


def lr_problem(steps=300, optimizer=None):
    """Least squares (n=20, d=8) trained by GD with learning rate exp(λ['log_lr'])."""
    x, y, xv, yv = ridge_data(n=20, nv=40, d=8, seed=0)

    def loss(w, lam, batch):
        bx, by = batch
        return jnp.mean((bx @ w - by) ** 2)

    dyn = hg.Dynamics(
        init=jnp.zeros(x.shape[1]),
        loss=loss,
        optimizer=optimizer or hg.optim.sgd(),
        optimizer_hparams=lambda lam, t: {"lr": jnp.exp(lam["log_lr"])},
        data=(jnp.asarray(x), jnp.asarray(y)),
        steps=steps,
    )

    def objective(w, lam):
        return jnp.mean((xv @ w - yv) ** 2)

    return dyn, objective


TOO_SMALL = {"log_lr": jnp.log(jnp.asarray(0.003))}  # 100x below a good 0.3


@pytest.mark.parametrize("method", [hg.Forward(), hg.Truncated(10)], ids=repr)
def test_raises_a_learning_rate_100x_too_small_and_beats_the_fixed_setting(method):
    dyn, objective = lr_problem()
    fixed = float(objective(dyn.run(TOO_SMALL), TOO_SMALL))
    res = online(dyn, objective, TOO_SMALL, method=method, every=10, hyper_optimizer=optax.adam(0.2))
    lr = np.exp(res.history["hparams"]["log_lr"])
    assert res.steps == 30 and lr.shape == (30,) and lr[0] == pytest.approx(0.003)
    assert np.exp(float(res.hparams["log_lr"])) > 10 * 0.003  # raised within the one run
    assert res.value < fixed - 0.05  # and the run ends better than with the fixed setting
    assert res.value == pytest.approx(float(objective(res.params, res.hparams)), rel=1e-12)
    assert res.history["train_loss"].shape == (300,)
    assert res.history["value"].shape == res.history["grad_norm"].shape == res.history["seconds"].shape == (30,)


@pytest.mark.slow
def test_rtho_tangent_is_carried_exactly():
    """With λ frozen, the RTHO hypergradient at update k is Forward-HG of the first (k+1)Δ steps.

    λ holds init scales, L2 strengths and per-example weights, so Z_0 = ∂s_0/∂λ and the
    momentum buffer's tangent both matter.
    """

    def fixed(lam, t):
        return {"lr": 0.3, "momentum": 0.8}

    dyn, objective, lam = mlp_problem(steps=9, hparams=fixed)
    lam = {k: lam[k] for k in ("log_l2", "log_scale", "example_logit")}
    res = online(dyn, objective, lam, method=hg.Forward(), every=3, hyper_optimizer=optax.sgd(0.0))
    for k in range(3):
        prefix, _, _ = mlp_problem(steps=3 * (k + 1), hparams=fixed)
        ref = hg.hypergrad(prefix, objective, lam, hg.Forward())
        assert res.history["value"][k] == pytest.approx(float(ref.value), rel=1e-12)
        norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(ref.grad)))
        assert res.history["grad_norm"][k] == pytest.approx(norm, rel=1e-10)


def test_trho_is_truncated_reverse_over_each_interval():
    dyn, objective = lr_problem(steps=40, optimizer=hg.optim.momentum())
    dyn = hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer,
                      lambda lam, t: {"lr": jnp.exp(lam["log_lr"]), "momentum": 0.5}, dyn.data, 40)
    lam = {"log_lr": jnp.log(jnp.asarray(0.05))}
    res = online(dyn, objective, lam, method=hg.Truncated(4), every=10, hyper_optimizer=optax.sgd(0.0))
    for k in range(4):
        prefix = hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer, dyn.optimizer_hparams, dyn.data, 10 * (k + 1))
        ref = hg.hypergrad(prefix, objective, lam, hg.Truncated(4))
        assert res.history["value"][k] == pytest.approx(float(ref.value), rel=1e-12)
        assert res.history["grad_norm"][k] == pytest.approx(abs(float(ref.grad["log_lr"])), rel=1e-10)


def momentum_lr_problem(steps):
    dyn, objective = lr_problem(steps=steps, optimizer=hg.optim.momentum())
    return hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer,
                       lambda lam, t: {"lr": jnp.exp(lam["log_lr"]), "momentum": 0.5}, dyn.data, steps), objective


def scheduled(dyn, every, steps):
    """``dyn`` for ``steps`` steps with λ = {"schedule": one log lr per interval, "shift": δ}: interval i
    trains at exp(schedule[i] + δ)."""
    def hparams(lam, t):
        log_lr = lam["schedule"][t // every] + lam["shift"]
        return dyn.optimizer_hparams({"log_lr": log_lr}, t)

    return hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer, hparams, dyn.data, steps)


def test_trho_window_reaching_into_earlier_intervals_shifts_their_lambda():
    """Truncated(k = 3Δ): update j backpropagates through intervals j-2..j, which trained under
    λ_{j-2}, λ_{j-1}, λ_j, with respect to a shift of all three; the training itself is a plain
    run under the λ schedule."""
    every, steps, rate = 10, 60, 0.5
    dyn, objective = momentum_lr_problem(steps)
    lam = {"log_lr": jnp.log(jnp.asarray(0.05))}
    res = online(dyn, objective, lam, method=hg.Truncated(3 * every), every=every, hyper_optimizer=optax.sgd(rate))
    schedule = np.asarray(res.history["hparams"]["log_lr"])
    assert np.ptp(schedule) > 0.1  # λ moved: earlier intervals trained under other λ
    grads = -np.diff(np.append(schedule, float(res.hparams["log_lr"]))) / rate
    for j in range(steps // every):
        prefix = scheduled(dyn, every, (j + 1) * every)
        point = {"schedule": jnp.asarray(schedule[: j + 1]), "shift": jnp.asarray(0.0)}
        ref = hg.hypergrad(prefix, objective, point, hg.Truncated(3 * every))
        assert res.history["value"][j] == pytest.approx(float(ref.value), rel=1e-12)
        assert grads[j] == pytest.approx(float(ref.grad["shift"]), rel=1e-8, abs=1e-12)
    # central differences of the shift, the window's start state held (update 4: intervals 2..4)
    j, eps = 4, 1e-5
    start = scheduled(dyn, every, (j - 2) * every)
    held = train(start, {"schedule": jnp.asarray(schedule[: j - 1]), "shift": jnp.asarray(0.0)})[0]

    def window(shift):
        lam = {"schedule": jnp.asarray(schedule[: j + 1]), "shift": jnp.asarray(shift)}
        state, _ = scheduled(dyn, every, (j + 1) * every).rollout(held, lam, (j - 2) * every, 3 * every)
        return float(objective(state.params, lam))

    assert grads[j] == pytest.approx((window(eps) - window(-eps)) / (2 * eps), rel=1e-6)
    plain = scheduled(dyn, every, steps).run({"schedule": jnp.asarray(schedule), "shift": jnp.asarray(0.0)})
    np.testing.assert_allclose(np.asarray(res.params), np.asarray(plain), rtol=1e-13, atol=1e-15)


def test_trho_long_window_with_lambda_frozen_is_truncated_reverse_of_the_run_so_far():
    dyn, objective = momentum_lr_problem(40)
    lam = {"log_lr": jnp.log(jnp.asarray(0.05))}
    res = online(dyn, objective, lam, method=hg.Truncated(20), every=10, hyper_optimizer=optax.sgd(0.0))
    for k in range(4):
        prefix = hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer, dyn.optimizer_hparams, dyn.data, 10 * (k + 1))
        ref = hg.hypergrad(prefix, objective, lam, hg.Truncated(20))
        assert res.history["grad_norm"][k] == pytest.approx(abs(float(ref.grad["log_lr"])), rel=1e-10)


def test_objective_may_take_the_hyper_step_index():
    """(w, λ, k): a validation minibatch per update."""
    dyn, _ = lr_problem(steps=30)
    _, _, xv, yv = ridge_data(n=20, nv=40, d=8, seed=0)
    val = hg.Batches((jnp.asarray(xv), jnp.asarray(yv)), batch_size=10)

    def objective(w, lam, k):
        bx, by = val(k)
        return jnp.mean((bx @ w - by) ** 2)

    lam = {"log_lr": jnp.log(jnp.asarray(0.1))}
    res = online(dyn, objective, lam, method=hg.Truncated(5), every=10, hyper_optimizer=optax.sgd(0.0))
    for k in range(3):
        prefix = hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer, dyn.optimizer_hparams, dyn.data, 10 * (k + 1))
        assert res.history["value"][k] == pytest.approx(float(objective(prefix.run(lam), lam, k)), rel=1e-12)
    assert res.value == pytest.approx(float(objective(res.params, lam, 3)), rel=1e-12)


def test_steps_after_the_last_update_train_with_the_final_lambda():
    dyn, objective = lr_problem(steps=25)
    res = online(dyn, objective, TOO_SMALL, method=hg.Truncated(10), hyper_optimizer=optax.adam(0.2))
    assert res.steps == 2 and res.history["train_loss"].shape == (25,)


def test_constraint_inside_the_compiled_loop():
    dyn, objective = lr_problem(steps=100)
    cap = np.log(0.01)

    def constraint(lam):
        return {"log_lr": jnp.minimum(lam["log_lr"], cap)}

    res = online(dyn, objective, TOO_SMALL, every=10, hyper_optimizer=optax.adam(0.5), constraint=constraint)
    assert np.all(res.history["hparams"]["log_lr"] <= cap + 1e-15)
    assert float(res.hparams["log_lr"]) == pytest.approx(cap)


@pytest.mark.parametrize("method", [hg.Forward(), hg.Truncated(30), hg.PES(0.3, 3, key=7)], ids=repr)
def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, monkeypatch, method):
    dyn, objective = lr_problem(steps=100)
    kwargs = dict(method=method, every=10, hyper_optimizer=optax.adam(0.2), chunk=3)
    reference = online(dyn, objective, TOO_SMALL, **kwargs)
    saves = []
    real_save = checkpoint_module.save

    def crash_after_two(*args, **kw):
        real_save(*args, **kw)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(checkpoint_module, "save", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        online(dyn, objective, TOO_SMALL, checkpoint_dir=tmp_path, **kwargs)
    monkeypatch.setattr(checkpoint_module, "save", real_save)
    resumed = online(dyn, objective, TOO_SMALL, checkpoint_dir=tmp_path, **kwargs)
    assert float(resumed.hparams["log_lr"]) == float(reference.hparams["log_lr"])
    np.testing.assert_array_equal(np.asarray(resumed.params), np.asarray(reference.params))
    np.testing.assert_array_equal(resumed.history["value"], reference.history["value"])
    np.testing.assert_array_equal(resumed.history["train_loss"], reference.history["train_loss"])
    with pytest.raises(CheckpointMismatchError, match="every"):
        online(dyn, objective, TOO_SMALL, checkpoint_dir=tmp_path, **{**kwargs, "every": 5})
    if isinstance(method, hg.PES):  # other draws would not continue this run
        with pytest.raises(CheckpointMismatchError, match="method"):
            online(dyn, objective, TOO_SMALL, checkpoint_dir=tmp_path, **{**kwargs, "method": hg.PES(0.3, 3, key=8)})


def push_lr(amount):
    def update(updates, state, params=None):
        return {"log_lr": jnp.full_like(updates["log_lr"], amount)}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def test_divergence_names_the_hyper_step_and_the_training_step():
    dyn, objective = lr_problem(steps=200)
    lam = {"log_lr": jnp.log(jnp.asarray(0.1))}
    # log lr + 25 per update: lr 0.1 -> 7e9 at the first update, which overflows within 20 steps
    with pytest.raises(HyperDivergenceError) as info:
        online(dyn, objective, lam, method=hg.Truncated(20), hyper_optimizer=push_lr(25.0))
    err = info.value
    assert err.hyper_step == 1 and 20 <= err.step < 40
    assert f"hyper-step 1 diverged at training step {err.step}" in str(err)
    assert "smaller hyper learning rate" in str(err)
    assert float(err.hparams["log_lr"]) == pytest.approx(np.log(0.1))  # the last good λ
    assert err.history["value"].shape == (1,)


def test_only_forward_and_truncated():
    dyn, objective = lr_problem(steps=20)
    with pytest.raises(hg.MethodError, match="Forward"):
        online(dyn, objective, TOO_SMALL, method=hg.Reverse(), every=5)
    with pytest.raises(ValueError, match="every"):
        online(dyn, objective, TOO_SMALL, method=hg.Forward())
    with pytest.raises(ValueError, match="k <= 5 or a multiple of 5"):
        online(dyn, objective, TOO_SMALL, method=hg.Truncated(8), every=5)
    with pytest.raises(ValueError, match="longer than the training run"):
        online(dyn, objective, TOO_SMALL, method=hg.Forward(), every=50)


def test_progress_bar(capsys):
    dyn, objective = lr_problem(steps=20)
    online(dyn, objective, TOO_SMALL, every=5, progress=True)
    assert "objective=" in capsys.readouterr().err


def test_a_second_call_on_the_same_problem_compiles_nothing():
    dyn, objective = lr_problem(steps=40)
    traces = []

    def counted(w, lam):
        traces.append(1)  # runs once per trace, never in a compiled call
        return objective(w, lam)

    opt = optax.adam(0.2)
    for method in (hg.Forward(), hg.Truncated(5)):
        first = online(dyn, counted, TOO_SMALL, method=method, every=10, hyper_optimizer=opt)
        n = len(traces)
        assert n > 0
        second = online(dyn, counted, TOO_SMALL, method=method, every=10, hyper_optimizer=opt)
        assert len(traces) == n, f"{method!r}: the second call traced the objective again"
        assert float(second.value) == float(first.value)
        np.testing.assert_array_equal(second.history["value"], first.history["value"])
    online(dyn, counted, TOO_SMALL, method=hg.Truncated(5), every=5, hyper_optimizer=opt)
    assert len(traces) > n  # another Δ is another program


def test_progress_bar_of_a_cached_run_counts_its_own_hyper_steps(capsys):
    dyn, objective = lr_problem(steps=20)
    for _ in range(2):
        online(dyn, objective, TOO_SMALL, every=5, progress=True)
        err = capsys.readouterr().err
        assert "4/4" in err and "objective=" in err


def test_an_unhashable_hyper_optimizer_still_runs():
    import dataclasses

    @dataclasses.dataclass  # eq=True without frozen: instances are unhashable
    class Wrapped:
        inner: optax.GradientTransformation

        def init(self, params):
            return self.inner.init(params)

        def update(self, updates, state, params=None):
            return self.inner.update(updates, state, params)

    dyn, objective = lr_problem(steps=20)
    opt = Wrapped(optax.adam(0.2))
    with pytest.raises(TypeError):
        hash(opt)
    res = online(dyn, objective, TOO_SMALL, every=5, hyper_optimizer=opt)
    ref = online(dyn, objective, TOO_SMALL, every=5, hyper_optimizer=optax.adam(0.2))
    np.testing.assert_allclose(res.history["value"], ref.history["value"], rtol=1e-12)


def test_a_fresh_but_equal_hyper_optimizer_reuses_the_compiled_loop():
    dyn, objective = lr_problem(steps=40)
    traces = []

    def counted(w, lam):
        traces.append(1)
        return objective(w, lam)

    first = online(dyn, counted, TOO_SMALL, every=10, hyper_optimizer=optax.adam(0.2))
    n = len(traces)
    second = online(dyn, counted, TOO_SMALL, every=10, hyper_optimizer=optax.adam(0.2))  # written inline again
    assert len(traces) == n
    np.testing.assert_array_equal(second.history["value"], first.history["value"])
    online(dyn, counted, TOO_SMALL, every=10, hyper_optimizer=optax.adam(0.3))
    assert len(traces) > n  # another hyper learning rate is another program


def test_resume_with_another_lambda0_or_hyper_optimizer_is_refused(tmp_path):
    dyn, objective = lr_problem(steps=40)
    online(dyn, objective, TOO_SMALL, every=10, hyper_optimizer=optax.adam(0.2), checkpoint_dir=tmp_path, chunk=2)
    with pytest.raises(CheckpointMismatchError, match="other initial hyperparameters"):
        online(dyn, objective, {"log_lr": jnp.asarray(-3.0)}, every=10, hyper_optimizer=optax.adam(0.2),
               checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match="another hyper-optimizer"):
        online(dyn, objective, TOO_SMALL, every=10, hyper_optimizer=optax.adam(0.1), checkpoint_dir=tmp_path)


def test_online_keeps_the_best_hyperparameters():
    dyn, objective = lr_problem(steps=40)
    res = online(dyn, objective, TOO_SMALL, every=10, hyper_optimizer=optax.adam(0.2))
    seen = list(res.history["value"]) + [res.value]
    assert res.best_value == pytest.approx(min(seen), rel=1e-12) and res.best_step == int(np.argmin(seen))
    if res.best_step < res.steps:
        np.testing.assert_allclose(float(res.best_hparams["log_lr"]), float(res.history["hparams"]["log_lr"][res.best_step]))


def test_the_checkpoint_format_is_fixed(tmp_path):
    """The stored trees and header keys: what a checkpoint written by an earlier version holds."""
    dyn, objective = lr_problem(steps=40)
    online(dyn, objective, TOO_SMALL, every=10, checkpoint_dir=tmp_path, chunk=2, progress=False)
    saved = checkpoint_module.load(tmp_path / "online")
    assert set(saved.specs) == {"carry", "rows", "seconds"}
    assert set(saved.header) == {"driver", "method", "every", "train_steps", "weights", "hparams0", "hyper_optimizer",
                                 "constraint", "step"}
    assert saved.header["driver"] == "online" and saved.header["step"] == 4
