"""ES, PES and NRES: evolution-strategy hypergradients, checked against closed forms in expectation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergradient as hg
from hypergradient.dynamics import train

jax.config.update("jax_enable_x64", True)

ETA, T = 0.1, 20
RHO = 1 - (1 - ETA) ** T  # w_T = ρ a for the run below


def target_run(steps=T):
    """GD on ½‖w − a‖² from w_0 = 0 at rate η: w_t = (1 − (1 − η)^t) a, linear in the λ of every step."""
    return hg.Dynamics(init=jnp.zeros(3), loss=lambda w, lam, batch: 0.5 * jnp.sum((w - lam["a"]) ** 2),
                       optimizer=hg.optim.sgd(), optimizer_hparams=lambda lam, t: {"lr": ETA}, steps=steps)


def cubic(w, lam):
    return jnp.sum(w ** 3) + lam["b"] * jnp.sum(w) + lam["b"] ** 2


def quadratic(w, lam):
    return 0.5 * jnp.sum((w - jnp.array([1.0, -2.0, 0.5])) ** 2) + lam["b"] * jnp.sum(w) + lam["b"] ** 2


LAM = {"a": jnp.array([0.3, -0.2, 0.1]), "b": jnp.asarray(0.2)}


def stacked(samples):
    """Samples of λ (a leading axis on every leaf) as rows of λ's flattened components."""
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(samples)], axis=1)


def mean_and_error(samples):
    """Per component of λ: the mean over the leading axis and its standard error."""
    rows = stacked(samples)
    return rows.mean(0), rows.std(0, ddof=1) / np.sqrt(rows.shape[0])


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def test_es_is_the_gradient_of_the_gaussian_smoothed_objective():
    # f(λ) = ρ³ Σ a_k³ + ρ b Σ a_k + b², so E_z f(λ + σz) has the gradient
    # ∂/∂a_k = 3ρ³(a_k² + σ²) + ρb, ∂/∂b = ρ Σ a + 2b: the smoothing adds 3ρ³σ² to each a_k
    sigma, dyn = 0.5, target_run()
    keys = jax.random.split(jax.random.key(0), 200)
    sols = jax.jit(jax.vmap(lambda k: hg.value_and_grad(dyn, cubic, LAM, hg.ES(sigma, 16, key=k))))(keys)
    mean, error = mean_and_error(sols.grad)
    a, b = np.asarray(LAM["a"]), float(LAM["b"])
    smoothed = np.concatenate([3 * RHO ** 3 * (a ** 2 + sigma ** 2) + RHO * b, [RHO * a.sum() + 2 * b]])
    assert np.all(np.abs(mean - smoothed) < 4 * error), (mean, smoothed, error)
    exact = flat(hg.hypergrad(dyn, cubic, LAM).grad)
    assert np.all(np.abs(exact[:3] - smoothed[:3]) > 10 * error[:3])  # the smoothing is seen
    # stats: the variance each estimate reports is the spread of the estimates across keys
    spread = float(np.sum(np.var(stacked(sols.grad), axis=0, ddof=1)))
    assert float(np.mean(sols.stats["variance"])) == pytest.approx(spread, rel=0.25)
    assert int(sols.stats["runs"][0]) == 32 and not np.any(sols.diverged)
    np.testing.assert_allclose(sols.value, float(cubic(dyn.run(LAM), LAM)), rtol=1e-12)  # the unperturbed run


def last_segment(method, dyn, objective, lam, every):
    """The method's estimate at the end of the last of T/Δ segments, λ held fixed."""
    carry = method.start(dyn, lam, every)
    for j in range(dyn.steps // every):
        carry, _, grad, _ = method.segment(dyn, objective, carry, lam, jnp.int32(j * every), every)
    return grad


@functools.cache
def estimates(method, n_keys, seed, every=5):
    dyn = target_run()
    keys = jax.random.split(jax.random.key(seed), n_keys)
    if method is hg.ES:
        one = lambda k: hg.value_and_grad(dyn, quadratic, LAM, hg.ES(0.3, 4, key=k)).grad  # noqa: E731
    else:
        energy = lambda s, lam: dyn.objective_at(quadratic, s, lam)  # noqa: E731 (how hg.online calls it)
        one = lambda k: last_segment(method(0.3, 4, key=k), dyn, energy, LAM, every)  # noqa: E731
    return jax.jit(jax.vmap(one))(keys)


def test_pes_over_truncations_equals_whole_run_es_in_expectation():
    # the objective is quadratic in every step's λ, so both smoothed gradients are the exact one
    pes_mean, pes_error = mean_and_error(estimates(hg.PES, 400, 2))
    es_mean, es_error = mean_and_error(estimates(hg.ES, 400, 3))
    assert np.all(np.abs(pes_mean - es_mean) < 4 * np.hypot(pes_error, es_error)), (pes_mean, es_mean)
    dyn = target_run()
    exact = flat(hg.hypergrad(dyn, quadratic, LAM).grad)
    assert np.all(np.abs(pes_mean - exact) < 4 * pes_error)
    # what one segment alone sees (Truncated(Δ)) is far from it: the accumulated ξ matters
    short = flat(hg.hypergrad(dyn, quadratic, LAM, hg.Truncated(5)).grad)
    assert np.max(np.abs(short - exact) / pes_error) > 10


def test_nres_variance_is_not_above_pes_at_equal_compute():
    pes, nres = estimates(hg.PES, 400, 2), estimates(hg.NRES, 400, 5)
    nres_mean, nres_error = mean_and_error(nres)
    exact = flat(hg.hypergrad(target_run(), quadratic, LAM).grad)
    assert np.all(np.abs(nres_mean - exact) < 4 * nres_error)  # unbiased too
    variance = {name: np.sum(np.var(stacked(g), axis=0, ddof=1)) for name, g in (("pes", pes), ("nres", nres))}
    assert variance["nres"] <= variance["pes"], variance


def log_lr_run(steps=100, **kwargs):
    """Least squares trained by GD at learning rate exp(λ['log_lr'])."""
    rng = np.random.default_rng(0)
    x, xv = rng.normal(size=(20, 4)), rng.normal(size=(30, 4))
    w = rng.normal(size=4)
    y, yv = x @ w + 0.1 * rng.normal(size=20), xv @ w

    def loss(w, lam, batch):
        return jnp.mean((x @ w - y) ** 2)

    def objective(w, lam):
        return jnp.mean((xv @ w - yv) ** 2)

    dyn = hg.Dynamics(init=jnp.zeros(4), loss=loss, optimizer=hg.optim.sgd(),
                      optimizer_hparams=lambda lam, t: {"lr": jnp.exp(lam["log_lr"])}, steps=steps, **kwargs)
    return dyn, objective


SMALL_LR = {"log_lr": jnp.log(jnp.asarray(0.005))}


@pytest.mark.parametrize("method", [hg.PES(0.3, 4, key=0), hg.NRES(0.3, 4, key=0)], ids=repr)
def test_online_raises_a_learning_rate_that_is_too_small(method):
    dyn, objective = log_lr_run()
    fixed = float(objective(dyn.run(SMALL_LR), SMALL_LR))
    res = hg.online(dyn, objective, SMALL_LR, method=method, every=10, hyper_optimizer=optax.adam(0.3))
    assert res.value < 0.5 * fixed and float(res.hparams["log_lr"]) > float(SMALL_LR["log_lr"]) + 1


@pytest.mark.parametrize("method", [hg.ES(0.2, 3, key=1), hg.PES(0.2, 3, key=1), hg.NRES(0.2, 3, key=1)], ids=repr)
def test_under_jit_and_vmap(method):
    dyn = target_run()
    lams = {"a": jnp.array([[0.3, -0.2, 0.1], [1.0, 0.5, -0.5]]), "b": jnp.array([0.2, -0.1])}
    batched = jax.jit(jax.vmap(lambda lam: hg.value_and_grad(dyn, cubic, lam, method)))(lams)
    for i in range(2):
        lam = jax.tree.map(lambda x: x[i], lams)
        one = hg.hypergrad(dyn, cubic, lam, method)
        np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[i], batched.grad)), flat(one.grad), rtol=1e-10)
        assert float(batched.value[i]) == pytest.approx(float(one.value), rel=1e-12)
        assert one.stats["runs"] == 6 and one.stats["variance"] > 0
    # each λ draws its own perturbations: the two members' estimates are not of the same directions
    assert not np.allclose(batched.stats["variance"][0], batched.stats["variance"][1])


def stateful_run():
    """A run with model state (a running mean of the weights) and per-step keys (noise on the loss),
    trained by an optax optimizer."""
    def loss(w, lam, batch, state, key):
        noise = 0.1 * jax.random.normal(key, w.shape)
        return 0.5 * jnp.sum((w - lam["a"] + noise) ** 2), 0.9 * state + 0.1 * w

    def objective(w, lam, state):
        return jnp.sum(w ** 3) + jnp.sum(state) * lam["b"]

    opt = hg.optim.from_optax(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
    dyn = hg.Dynamics(init=jnp.zeros(3), loss=loss, optimizer=opt,
                      optimizer_hparams=lambda lam, t: {"learning_rate": jnp.exp(lam["log_lr"])},
                      steps=12, state=jnp.zeros(3), key=jax.random.key(3))
    return dyn, objective


def test_one_segment_of_pes_and_nres_is_es_with_state_keys_and_optax():
    dyn, objective = stateful_run()
    lam = {"a": jnp.array([0.5, -0.3, 0.2]), "b": jnp.asarray(0.4), "log_lr": jnp.log(jnp.asarray(0.1))}
    methods = (hg.ES(0.1, 5, key=11), hg.PES(0.1, 5, key=11), hg.NRES(0.1, 5, key=11), hg.ES(0.01, 2000, key=0),
               hg.Reverse())
    es, pes, nres, many, exact = jax.jit(lambda lam: [hg.value_and_grad(dyn, objective, lam, m) for m in methods])(lam)
    for other in (pes, nres):
        np.testing.assert_allclose(flat(other.grad), flat(es.grad), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(other.state), np.asarray(es.state), rtol=1e-12)
    # the unperturbed run is plain training (same step keys), and many pairs approach the exact gradient
    state, _ = train(dyn, lam)
    np.testing.assert_allclose(float(es.value), float(objective(state.params, lam, state=state.model_state)),
                               rtol=1e-12)
    assert np.linalg.norm(flat(many.grad) - flat(exact.grad)) < 4 * np.sqrt(float(many.stats["variance"])) + 1e-3


def test_a_perturbed_run_that_diverges_is_named():
    dyn, objective = log_lr_run(steps=200)
    lam = {"log_lr": jnp.log(jnp.asarray(0.3))}
    with pytest.raises(hg.DivergenceError, match=r"perturbed training runs diverged .*smaller sigma"):
        hg.hypergrad(dyn, objective, lam, hg.ES(5.0, 4, key=0))
    with pytest.raises(hg.HyperDivergenceError):
        hg.online(dyn, objective, lam, method=hg.PES(5.0, 4, key=0), every=50, progress=False)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="sigma"):
        hg.ES(sigma=0.0)
    with pytest.raises(ValueError, match="pairs"):
        hg.PES(pairs=0)
    with pytest.raises(TypeError, match="key"):
        hg.NRES(key="seed")
    assert hg.ES(0.1, 2, key=3) == hg.ES(0.1, 2, key=jax.random.key(3)) != hg.ES(0.1, 2, key=4)
    assert hash(hg.PES(0.1, 2, key=3)) == hash(hg.PES(0.1, 2, key=jax.random.key(3)))
    dyn, objective = log_lr_run(steps=20)
    with pytest.raises(ValueError, match="needs every"):
        hg.online(dyn, objective, SMALL_LR, method=hg.PES())
    with pytest.raises(hg.MethodError, match="PES"):
        hg.online(dyn, objective, SMALL_LR, method=hg.ES(), every=5)
