"""Reversible: exact reversal bit for bit, agreement with Reverse, clear errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hypergradient as hg
from hypergradient.methods import _fixedpoint as fp
from hypergradient.methods._layout import Layout
from hypergradient.errors import Failure, MethodError
from hypergradient.hypergrad import compiled
from hypergradient.methods.reversible import ReversalError, Reversible
from problems import mlp_problem

jax.config.update("jax_enable_x64", True)

OPTIMIZERS = {
    "sgd": hg.optim.sgd,
    "momentum": hg.optim.momentum,
    "momentum_dampened": lambda: hg.optim.momentum(dampen=True),
}


hypergrad = hg.hypergrad  # raises ReversalError itself when the run's flags show a failure


def assert_tree_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(y)) + 1e-30))


def sgd_hparams(lam, t):
    return {"lr": list(lam["lr"][t])}


def problem(name, steps):
    dyn, objective, lam = mlp_problem(
        steps=steps, optimizer=OPTIMIZERS[name](), hparams=sgd_hparams if name == "sgd" else None
    )
    if name == "sgd":
        lam = {k: v for k, v in lam.items() if k != "momentum"}
    return dyn, objective, lam


# -- the fixed-point machinery on its own ------------------------------------------

@functools.lru_cache(maxsize=None)
def _roundtrip(dtype, size, steps):
    fmt = fp.format_for(dtype)
    d = fmt.mu_bits

    @jax.jit
    def run(v0, mus, incs):
        buf = fp.empty(fmt, size, fp.capacity_words(fmt, steps * (fmt.bits + fmt.mu_bits)))

        def forward(carry, x):
            v, buf = carry
            mu, inc = x
            n, bad = fp.rational(fmt, mu)
            buf, s = fp.decode(fmt, buf, n)
            v, e = fp.mul(fmt, v, n, s)
            buf = fp.encode_pow2(fmt, buf, e, d)
            buf = fp.push_raw(fmt, buf, inc)  # a raw word too, as sgd does
            return (v + inc, buf), (v, bad)

        def backward(carry, x):
            v, buf = carry
            mu, inc = x
            n, _ = fp.rational(fmt, mu)
            buf, popped = fp.pop_raw(fmt, buf)
            v = v - popped
            buf, e = fp.decode_pow2(fmt, buf, d)
            v, s = fp.mul_inverse(fmt, v, e, n)
            return (v, fp.encode(fmt, buf, s, n)), popped == inc

        (vT, bufT), (scaled, bad) = jax.lax.scan(forward, (v0, buf), (mus, incs))
        (vb, bufb), same = jax.lax.scan(backward, (vT, bufT), (mus, incs), reverse=True)
        return vb, fp.is_empty(fmt, bufb), same, bufT.overflow + bufT.underflow + bufb.underflow, jnp.sum(bad), scaled

    return fmt, run


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "float64"]),
    size=st.sampled_from([1, 33]),
    steps=st.sampled_from([1, 19]),
    seed=st.integers(0, 2**31 - 1),
    mu_low=st.floats(2.0**-15, 0.99),
)
def test_exact_reversal_restores_state_and_buffer_bit_for_bit(dtype, size, steps, seed, mu_low):
    fmt, run = _roundtrip(dtype, size, steps)
    rng = np.random.default_rng(seed)
    bound = fmt.limit // 4
    v0 = rng.integers(-bound, bound, size=size, dtype=np.int64).astype(fmt.int_dtype)
    mus = rng.uniform(mu_low, 1.0, size=(steps, size)).astype(dtype)
    incs = rng.integers(-(2**20), 2**20, size=(steps, size)).astype(fmt.int_dtype)
    vb, empty, same, flow, bad, scaled = run(jnp.asarray(v0), jnp.asarray(mus), jnp.asarray(incs))
    assert int(flow) == 0 and int(bad) == 0
    np.testing.assert_array_equal(np.asarray(vb), v0)
    assert np.all(np.asarray(empty)) and np.all(np.asarray(same))


def test_rational_multiplication_rounds_to_within_one_unit():
    fmt, run = _roundtrip("float64", 33, 1)
    rng = np.random.default_rng(0)
    v0 = rng.integers(-(2**50), 2**50, size=33)
    mus = rng.uniform(0.01, 1.0, size=(1, 33))
    _, _, _, _, _, scaled = run(jnp.asarray(v0), jnp.asarray(mus), jnp.zeros((1, 33), jnp.int64))
    n = np.round(mus[0] * 2.0**fmt.mu_bits)
    exact = v0.astype(object) * n.astype(np.int64).astype(object) / 2**fmt.mu_bits
    assert all(abs(float(int(a) - b)) < 1 for a, b in zip(np.asarray(scaled[0]), exact))



def test_layout_lays_the_leaves_end_to_end_and_hyperparameters_over_them():
    weights = {"W": jnp.arange(6.0).reshape(2, 3), "b": jnp.asarray([6.0, 7.0]), "s": jnp.asarray(8.0)}
    layout = Layout.of(weights)
    x = layout.flat(weights)
    np.testing.assert_array_equal(np.asarray(x), np.arange(9.0))  # leaves in tree order: W, b, s
    for a, b in zip(jax.tree.leaves(layout.unflatten(x)), jax.tree.leaves(weights)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    per_layer, count = layout.per_weight({"W": 1.0, "b": 2.0, "s": 3.0}, "lr", jnp.float64, lambda v: (v, 1))
    np.testing.assert_array_equal(np.asarray(per_layer), [1.0] * 6 + [2.0] * 2 + [3.0])
    assert count == 3  # derived once per layer, not once per weight
    scalar, _ = layout.per_weight(0.5, "lr", jnp.float64)
    assert jnp.shape(scalar) == ()
    with pytest.raises(ValueError, match="'lr'"):
        layout.per_weight({"W": 1.0}, "lr", jnp.float64)



# -- the method ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_matches_reverse_on_every_kind_of_hyperparameter(name):
    # per-step, per-layer lr and momentum schedules, L2, init scale, example weights
    dyn, objective, lam = problem(name, steps=12)
    reference = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    res = hypergrad(dyn, objective, lam, Reversible())
    assert res.stats["exact_reversal"] == 1.0 and res.stats["reversal_error"] == 0
    np.testing.assert_allclose(float(res.value), float(reference.value), rtol=1e-9)
    for group in lam:
        assert_tree_close(res.grad[group], reference.grad[group], rtol=1e-6)


@functools.lru_cache(maxsize=None)
def _random_schedule_problem(name, steps):
    return problem(name, steps)


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(list(OPTIMIZERS)),
    steps=st.just(7),  # one shape per optimizer: every example reuses two compiled programs
    seed=st.integers(0, 2**31 - 1),
    mu_range=st.tuples(st.floats(0.05, 0.99), st.floats(0.0, 1.0)),
)
@pytest.mark.slow
def test_random_schedules_reverse_exactly_and_match_reverse(name, steps, seed, mu_range):
    dyn, objective, lam = _random_schedule_problem(name, steps)
    rng = np.random.default_rng(seed)
    lam = dict(lam)
    lam["lr"] = jnp.asarray(rng.uniform(0.01, 0.5, size=lam["lr"].shape))
    if "momentum" in lam:
        low, width = mu_range
        lam["momentum"] = jnp.asarray(low + (1 - low) * width * rng.uniform(size=lam["momentum"].shape))
    res = hypergrad(dyn, objective, lam, Reversible(max_bits_per_step=5.0))
    assert res.stats["exact_reversal"] == 1.0
    reference = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    for group in lam:
        assert_tree_close(res.grad[group], reference.grad[group], rtol=1e-6)


@pytest.mark.slow
def test_float32_weights_run_in_int32_and_still_reverse_exactly():
    dyn, objective, lam = mlp_problem(steps=12)
    init64 = dyn.init
    dyn32 = hg.Dynamics(
        init=lambda lam: jax.tree.map(lambda x: x.astype(jnp.float32), init64(lam)),
        loss=lambda w, lam, batch: dyn.loss(w, lam, batch).astype(jnp.float32),
        optimizer=dyn.optimizer,
        optimizer_hparams=lambda lam, t: jax.tree.map(lambda x: x.astype(jnp.float32), dyn.hparams(lam, t)),
        data=dyn.data,
        steps=dyn.steps,
    )
    res = hypergrad(dyn32, objective, lam, Reversible())
    assert res.stats["exact_reversal"] == 1.0 and res.stats["frac_bits"] == 22
    reference = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    for group in lam:
        a, b = np.ravel(res.grad[group]), np.ravel(reference.grad[group])
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.999, group


@pytest.mark.parametrize("mu", [0.5, 0.9])
def test_buffer_holds_about_log2_one_over_mu_bits_per_weight_per_step(mu):
    dyn, objective, lam = problem("momentum_dampened", steps=12)
    lam = {**lam, "momentum": jnp.full_like(lam["momentum"], mu)}
    res = hypergrad(dyn, objective, lam, Reversible())
    bits = res.stats["bits_per_weight_per_step"]
    assert abs(bits - np.log2(1 / mu)) < 0.1 * np.log2(1 / mu) + 0.02
    assert res.stats["buffer_bytes_used"] < res.stats["trajectory_bytes_equivalent"] / 100


@pytest.mark.parametrize("mu, bits", [(0.5, 2.0), (0.9, 0.25), (0.99, 0.125)])
def test_default_buffer_is_sized_from_the_momentum_schedule(mu, bits):
    dyn, objective, lam = problem("momentum_dampened", steps=12)
    lam = {**lam, "momentum": jnp.full_like(lam["momentum"], mu)}
    assert Reversible().resolve(dyn, lam) == Reversible(max_bits_per_step=bits)
    compiled(dyn, objective, Reversible(), lam)  # compiling ahead resolves too, and hypergrad then reuses it
    res = hypergrad(dyn, objective, lam, Reversible())
    assert res.stats["method"] == repr(Reversible(max_bits_per_step=bits))
    assert res.stats["compile_seconds"] == 0.0
    assert res.stats["exact_reversal"] == 1.0


def test_sgd_keeps_a_full_word_per_step():
    dyn, objective, lam = problem("sgd", steps=5)
    res = hypergrad(dyn, objective, lam, Reversible())
    assert res.stats["bits_per_weight_per_step"] == pytest.approx(64, abs=0.5)


# -- errors --------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", [hg.optim.adam(), hg.optim.rmsprop(), hg.optim.nesterov()], ids=lambda o: o.name)
def test_optimizers_without_exact_inverse_are_refused_with_the_alternatives(optimizer):
    hparams = (lambda lam, t: {"lr": 0.01, "momentum": 0.9}) if optimizer.name == "nesterov" else (lambda lam, t: {"lr": 0.01})
    dyn, objective, lam = mlp_problem(steps=3, optimizer=optimizer, hparams=hparams)
    with pytest.raises(MethodError, match=rf"Reversible needs sgd or momentum .*{optimizer.name} has no exact inverse.*hg.Reverse\(checkpoint_every=\.\.\.\), hg.Forward\(\), hg.Truncated\(k\)"):
        hg.hypergrad(dyn, objective, lam, Reversible())


def test_values_beyond_the_fixed_point_range_raise_instead_of_wrapping():
    dyn, objective, lam = problem("momentum_dampened", steps=3)
    lam = {**lam, "log_scale": jnp.full_like(lam["log_scale"], 14.0)}  # weights ~1e6 > 2^18
    with pytest.raises(ReversalError, match="fixed-point range"):
        hypergrad(dyn, objective, lam, Reversible())


def test_fewer_fractional_bits_widen_the_range():
    dyn, objective, lam = problem("momentum_dampened", steps=3)
    lam = {**lam, "log_scale": jnp.full_like(lam["log_scale"], 14.0)}
    res = hypergrad(dyn, objective, lam, Reversible(frac_bits=30))
    assert res.stats["exact_reversal"] == 1.0


@pytest.mark.slow
def test_buffer_overflow_raises_and_names_the_capacity_to_give():
    dyn, objective, lam = problem("momentum_dampened", steps=12)
    lam = {**lam, "momentum": jnp.full_like(lam["momentum"], 1e-6)}  # ~20 bits per step
    with pytest.raises(ReversalError, match=r"overflowed.*needs about (19|20)\.\d.*max_bits_per_step="):
        hypergrad(dyn, objective, lam, Reversible(max_bits_per_step=1.0))
    res = hypergrad(dyn, objective, lam, Reversible(max_bits_per_step=25.0))
    assert res.stats["exact_reversal"] == 1.0


def test_momentum_outside_zero_one_raises():
    dyn, objective, lam = problem("momentum", steps=3)
    lam = {**lam, "momentum": jnp.full_like(lam["momentum"], 1.2)}
    with pytest.raises(ReversalError, match=r"momentum outside"):
        hypergrad(dyn, objective, lam, Reversible())


def test_a_failed_reversal_raises():
    with pytest.raises(ReversalError, match="bit for bit"):
        raise Reversible().failure(Failure.REVERSAL_MISMATCH, {"reversal_error": 3, "exact_reversal": 0.0})


def test_a_gradient_the_backward_pass_does_not_reproduce_is_named():
    # the loss changes between the forward and the backward loop (each traces it anew): the weights
    # are re-created bit for bit up to the last step, where the gradient first differs
    dyn, objective, lam = problem("momentum_dampened", steps=5)
    traces = []

    def loss(w, lam, batch):
        traces.append(None)
        return dyn.loss(w, lam, batch) * (1 + 1e-9 * len(traces))

    changing = hg.Dynamics(dyn.init, loss, dyn.optimizer, dyn.optimizer_hparams, dyn.data, dyn.steps)
    sol = jax.jit(lambda lam: hg.value_and_grad(changing, objective, lam, Reversible(max_bits_per_step=1.0)))(lam)
    assert int(sol.result) == Failure.GRADIENT_NOT_REPRODUCED
    assert int(sol.stats["reversal_departed_at_step"]) == 4
    stats = {k: np.asarray(v).item() for k, v in sol.stats.items()}
    with pytest.raises(ReversalError, match="at step 4.*gradient at bit-identical weights differed"):
        raise Reversible().failure(Failure.GRADIENT_NOT_REPRODUCED, stats)


def test_a_division_beyond_the_proven_bound_is_named_as_the_arithmetic(monkeypatch):
    # a float division 6% off (floor_divmod is exact up to 126 ulp in float32): the coder's integers
    # go wrong, and the error says so rather than blaming the gradient
    monkeypatch.setattr(fp, "_divide", lambda a, b: a / b * (1 + 2.0**-4))
    dyn, objective, lam = mlp_problem(steps=12, optimizer=hg.optim.momentum(dampen=True))
    dyn32 = hg.Dynamics(
        init=lambda lam: jax.tree.map(lambda x: x.astype(jnp.float32), dyn.init(lam)),
        loss=lambda w, lam, batch: dyn.loss(w, lam, batch).astype(jnp.float32),
        optimizer=dyn.optimizer,
        optimizer_hparams=lambda lam, t: jax.tree.map(lambda x: x.astype(jnp.float32), dyn.hparams(lam, t)),
        data=dyn.data,
        steps=dyn.steps,
    )
    with pytest.raises(ReversalError, match="integers went wrong with the gradients reproduced"):
        hypergrad(dyn32, objective, lam, Reversible())


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_bits_per_step"):
        Reversible(max_bits_per_step=0)
    with pytest.raises(ValueError, match="frac_bits"):
        fp.format_for(jnp.float64, frac_bits=70)
    with pytest.raises(ValueError, match="frac_bits"):
        fp.format_for(jnp.float64, frac_bits=True)
    assert fp.format_for(jnp.float64, frac_bits=np.int64(30)).frac_bits == 30
