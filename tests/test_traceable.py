"""hg.value_and_grad composes with JAX: jit, vmap, callable pytrees as init and objective."""

import ast
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergradient as hg
from problems import eqx_classifier, mlp_problem, ridge_problem


def assert_tree_close(a, b, rtol=1e-10):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * (float(jnp.max(jnp.abs(y))) + 1e-30))


def scaled(lam, scales):
    """λ multiplied by each of ``scales``, stacked along a new leading axis."""
    return jax.tree.map(lambda x: jnp.stack([s * x for s in scales]), lam)


@pytest.mark.slow
@pytest.mark.parametrize("method", [hg.Reverse(), hg.Forward()], ids=repr)
def test_vmap_over_three_hyperparameters_equals_three_calls(method):
    dyn, objective, lam = mlp_problem(steps=6)
    scales = (0.8, 1.0, 1.2)
    batched = jax.jit(jax.vmap(lambda l: hg.value_and_grad(dyn, objective, l, method)))(scaled(lam, scales))
    assert batched.value.shape == (3,) and batched.diverged.shape == (3,)
    for i, s in enumerate(scales):
        one = hg.hypergrad(dyn, objective, jax.tree.map(lambda x: s * x, lam), method)
        np.testing.assert_allclose(float(batched.value[i]), float(one.value), rtol=1e-12)
        assert_tree_close(jax.tree.map(lambda g: g[i], batched.grad), one.grad)
        assert_tree_close(jax.tree.map(lambda w: w[i], batched.params), one.params)
        assert not batched.diverged[i] and int(batched.result[i]) == hg.Failure.OK


def test_jit_and_nesting_in_user_code():
    dyn, objective, lam = ridge_problem(steps=15)

    @jax.jit
    def tuned_once(lam):  # one hyper-step of gradient descent, inside the user's own program
        sol = hg.value_and_grad(dyn, objective, lam)
        return jax.tree.map(lambda l, g: l - 0.1 * g, lam, sol.grad), sol.value

    new, value = tuned_once(lam)
    ref = hg.hypergrad(dyn, objective, lam)
    np.testing.assert_allclose(float(value), float(ref.value), rtol=1e-12)
    assert_tree_close(new, jax.tree.map(lambda l, g: l - 0.1 * g, lam, ref.grad))


def test_vmap_over_the_arrays_a_dynamics_holds():
    """Two training sets as one batched Dynamics: a hypergradient per data set in one program."""
    dyn, objective, lam = ridge_problem(steps=10)
    x, y = dyn.data
    other = hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer, dyn.optimizer_hparams, (2 * x, y), dyn.steps)
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), dyn, other)
    grads = jax.vmap(lambda d: hg.value_and_grad(d, objective, lam).grad)(both)
    for i, d in enumerate((dyn, other)):
        assert_tree_close(jax.tree.map(lambda g: g[i], grads), hg.hypergrad(d, objective, lam).grad)


def test_jit_of_run_and_divergence_outside_jit():
    dyn, objective, lam = ridge_problem(steps=10)
    assert_tree_close(jax.jit(dyn.run)(lam), dyn.run(lam), rtol=1e-14)
    bad = {**lam, "lr": jnp.asarray(1e40)}
    w = jax.jit(dyn.run)(bad)  # under jit nothing is raised ...
    assert not np.all(np.isfinite(np.asarray(w)))
    with pytest.raises(hg.DivergenceError, match="not finite at step"):  # ... outside it, it is
        dyn.run(bad)


def test_a_diverging_run_is_reported_not_raised_under_jit():
    dyn, objective, lam = ridge_problem(steps=10)
    sol = jax.jit(lambda l: hg.value_and_grad(dyn, objective, l))({**lam, "lr": jnp.asarray(1e40)})
    assert bool(sol.diverged) and int(sol.result) == hg.Failure.TRAINING_DIVERGED
    with pytest.raises(hg.DivergenceError, match="training diverged"):
        hg.hypergrad(dyn, objective, {**lam, "lr": jnp.asarray(1e40)})


def test_reversible_under_jit_equals_hypergrad():
    dyn, objective, lam = mlp_problem(steps=6, optimizer=hg.optim.momentum())
    lam = {k: lam[k] for k in ("lr", "momentum", "log_l2", "log_scale", "example_logit")}
    sol = jax.jit(lambda l: hg.value_and_grad(dyn, objective, l, hg.Reversible()))(lam)
    ref = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    assert int(sol.result) == hg.Failure.OK and float(sol.stats["exact_reversal"]) == 1.0
    assert_tree_close(sol.grad, ref.grad, rtol=1e-6)


@pytest.mark.slow
def test_an_equinox_module_as_init_equals_the_partition_route():
    steps = 8
    model, (x, y), (xv, yv), ce = eqx_classifier()
    lam = {"log_l2": jnp.asarray(-3.0), "lr": jnp.full(steps, 0.3)}
    l2 = lambda w: sum(jnp.sum(p**2) for p in jax.tree.leaves(eqx.filter(w, eqx.is_array)))  # noqa: E731
    common = dict(optimizer=hg.optim.momentum(), data=hg.Batches((x, y), 8), steps=steps,
                  optimizer_hparams=lambda lam, t: {"lr": lam["lr"][t], "momentum": 0.5})

    direct = hg.Dynamics(init=model, loss=lambda m, lam, b: ce(m, *b) + jnp.exp(lam["log_l2"]) * l2(m), **common)
    direct_obj = lambda m, lam: ce(m, xv, yv)  # noqa: E731

    weights, static = eqx.partition(model, eqx.is_array)
    routed = hg.Dynamics(init=weights, loss=lambda w, lam, b: ce(eqx.combine(w, static), *b)
                         + jnp.exp(lam["log_l2"]) * l2(w), **common)
    routed_obj = lambda w, lam: ce(eqx.combine(w, static), xv, yv)  # noqa: E731

    for method in (hg.Reverse(), hg.Forward()):
        a = hg.hypergrad(direct, direct_obj, lam, method)
        b = hg.hypergrad(routed, routed_obj, lam, method)
        np.testing.assert_allclose(float(a.value), float(b.value), rtol=1e-13)
        assert_tree_close(a.grad, b.grad, rtol=1e-12)
        assert isinstance(a.params, eqx.nn.MLP)  # the whole model comes back
    trained = direct.run(lam)
    assert isinstance(trained, eqx.nn.MLP) and trained(xv[0]).shape == (3,)
    tuned = hg.optimize(direct, direct_obj, lam, hyper_optimizer=optax.adam(0.05), hyper_steps=2, progress=False)
    assert isinstance(tuned.params, eqx.nn.MLP) and np.isfinite(tuned.value)


def test_an_objective_holding_its_arrays_is_compiled_once():
    """A Partial's arrays are arguments of the compiled program, not constants baked into it."""
    dyn, objective, lam = ridge_problem(steps=10)

    def mse(xv, yv, w, lam):
        return jnp.mean((xv @ w - yv) ** 2)

    rng = np.random.default_rng(1)
    xv, yv = jnp.asarray(rng.normal(size=(20, 4))), jnp.asarray(rng.normal(size=20))
    first = hg.hypergrad(dyn, jax.tree_util.Partial(mse, xv, yv), lam)
    second = hg.hypergrad(dyn, jax.tree_util.Partial(mse, 2 * xv, yv), lam)
    assert first.stats["compile_seconds"] > 0 and second.stats["compile_seconds"] == 0
    closure = hg.hypergrad(dyn, lambda w, lam: mse(2 * xv, yv, w, lam), lam)
    np.testing.assert_allclose(float(second.value), float(closure.value), rtol=1e-13)
    assert_tree_close(second.grad, closure.grad, rtol=1e-12)
    assert not np.isclose(float(first.value), float(second.value))


@pytest.mark.parametrize("method", [hg.Forward(), hg.Truncated(4)], ids=repr)
def test_a_whole_run_is_the_online_case_with_one_segment(method):
    """RTHO / TRHO run the method's own segment: with Δ = T the first hyper-step's objective and
    hypergradient are the whole-run ones."""
    dyn, objective, lam = mlp_problem(steps=8)
    whole = hg.hypergrad(dyn, objective, lam, method)
    res = hg.online(dyn, objective, lam, method, every=8, hyper_optimizer=optax.sgd(0.0), progress=False)
    np.testing.assert_allclose(res.history["value"][0], float(whole.value), rtol=1e-12)
    norm = float(np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(whole.grad))))
    np.testing.assert_allclose(res.history["grad_norm"][0], norm, rtol=1e-10)


def test_online_ticks_the_meter_of_each_call(capsys):
    dyn, objective, lam = ridge_problem(steps=12)
    meter = hg.TextProgressMeter(every_seconds=0)
    for _ in range(2):  # the second call reuses the compiled loop and ticks its own run
        hg.online(dyn, objective, lam, hg.Forward(), every=3, progress=meter)
        lines = capsys.readouterr().err.splitlines()
        assert [line.split(":")[0] for line in lines] == [f"hyper-steps {k}/4" for k in (1, 2, 3, 4)]


def test_the_core_imports_nothing_from_the_applications():
    root = pathlib.Path(hg.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "apps" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if "apps" in n.split(".")]
    assert offenders == []
