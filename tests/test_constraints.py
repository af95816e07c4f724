"""Tests of hypergradient.constraints: exact Euclidean projections.

Every coupling projection (simplex, l1_ball, box_l1) is checked against two
references: the projection QP solved by scipy's SLSQP, and an exact
breakpoint search written in numpy (g(τ) = Σ clip(x − τ, lo, hi) is piecewise
linear, so evaluating it at every breakpoint and interpolating gives the
threshold to rounding). The properties: feasibility, idempotence, the
variational inequality ⟨x − P(x), y − P(x)⟩ ≤ 0 for feasible y, and a distance
no larger than the reference's.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from hypergradient import constraints as hc

jax.config.update("jax_enable_x64", True)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# tolerances, relative to the scale of the problem
TOL = {np.float64: 1e-11, np.float32: 3e-6}


# --------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------


def exact_threshold(x, lo, hi, s):
    """τ with Σ clip(x − τ, lo, hi) = s, by evaluating g at every breakpoint."""
    x = np.asarray(x, np.float64)
    n = x.size

    def g(t):
        return np.clip(x[None, :] - np.asarray(t)[:, None], lo, hi).sum(axis=1)

    bps = np.concatenate([x - lo, x - hi])
    bps = bps[np.isfinite(bps)]
    left = min(bps.min(), (x.sum() - s) / n) - 1.0  # g(left) ≥ s, linear beyond
    grid = np.unique(np.concatenate([[left], bps, [bps.max() + 1.0]]))
    vals = g(grid)
    j = np.nonzero(vals >= s)[0].max()
    if j == grid.size - 1 or vals[j] == s:
        return grid[j]
    t0, t1, g0, g1 = grid[j], grid[j + 1], vals[j], vals[j + 1]
    return t0 + (g0 - s) * (t1 - t0) / (g0 - g1)


def ref_simplex(x, total):
    return np.maximum(x - exact_threshold(x, 0.0, np.inf, total), 0.0)


def ref_l1_ball(x, radius):
    if np.abs(x).sum() <= radius:
        return x
    return np.sign(x) * ref_simplex(np.abs(x), radius)


def ref_box_l1(x, lo, hi, radius):
    c = np.clip(x, lo, hi)
    if c.sum() <= radius:
        return c
    return np.clip(x - exact_threshold(x, lo, hi, radius), lo, hi)


def slsqp(x, x0, bounds=None, constraints=()):
    res = scipy.optimize.minimize(
        lambda y: 0.5 * np.sum((y - x) ** 2),
        x0,
        jac=lambda y: y - x,
        method="SLSQP",
        bounds=bounds,
        constraints=constraints,
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return res.x


def slsqp_simplex(x, total):
    n = x.size
    con = {"type": "eq", "fun": lambda y: y.sum() - total, "jac": lambda y: np.ones(n)}
    return slsqp(x, np.full(n, total / n), [(0, None)] * n, [con])


def slsqp_l1_ball(x, radius):
    # y = p − q with p, q ≥ 0 and Σ p + Σ q ≤ radius: a smooth QP.
    n = x.size
    con = {"type": "ineq", "fun": lambda pq: radius - pq.sum(), "jac": lambda pq: -np.ones(2 * n)}
    pq = slsqp(np.concatenate([x, -x]), np.zeros(2 * n), [(0, None)] * (2 * n), [con])
    return pq[:n] - pq[n:]


def slsqp_box_l1(x, lo, hi, radius):
    n = x.size
    con = {"type": "ineq", "fun": lambda y: radius - y.sum(), "jac": lambda y: -np.ones(n)}
    hi_b = None if np.isinf(hi) else hi
    return slsqp(x, np.full(n, lo), [(lo, hi_b)] * n, [con])


# feasible points, to test the variational inequality


def feasible_simplex(rng, n, total, k):
    return rng.dirichlet(np.ones(n), size=k) * total


def feasible_l1_ball(rng, n, radius, k):
    d = rng.standard_normal((k, n))
    d /= np.abs(d).sum(axis=1, keepdims=True)
    return d * radius * rng.uniform(0, 1, (k, 1))


def feasible_box_l1(rng, n, lo, hi, radius, k):
    top = min(hi, lo + radius) if np.isinf(hi) else hi
    y = lo + rng.uniform(0, 1, (k, n)) * (top - lo)
    excess = y.sum(axis=1) - radius
    room = (y - lo).sum(axis=1)
    scale = np.where(excess > 0, (radius - n * lo) / np.maximum(room, 1e-300), 1.0)
    return lo + (y - lo) * scale[:, None]


# --------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------

vectors = st.lists(
    st.floats(-10, 10, allow_nan=False, allow_infinity=False, allow_subnormal=False),
    min_size=1,
    max_size=10,
).map(np.array)
seeds = st.integers(0, 2**32 - 1)
positive = st.floats(0.05, 20.0)


@st.composite
def box_l1_params(draw, n):
    lo = draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0, allow_subnormal=False)))
    width = st.floats(0.0, 5.0, allow_subnormal=False)
    hi = draw(st.one_of(st.just(np.inf), width.map(lambda w: lo + w)))
    slack = draw(st.one_of(st.just(0.0), st.floats(0.0, 20.0, allow_subnormal=False)))
    radius = n * lo + slack
    if radius <= 0:
        radius = 0.5
    return lo, hi, radius


def check_projection(project, x, p, ref, feasible_ys, is_feasible, dtype):
    """Feasibility, idempotence, variational inequality, distance ≤ reference."""
    tol = TOL[dtype]
    scale = 1.0 + np.abs(x).max() + np.abs(ref).max()
    assert is_feasible(p, tol * scale * x.size)
    # idempotence
    pp = np.asarray(project(jnp.asarray(p, dtype)), np.float64)
    np.testing.assert_allclose(pp, p, rtol=0, atol=tol * scale * x.size)
    # variational inequality (for the projection of the dtype-rounded x)
    for y in list(feasible_ys) + [ref]:
        assert np.dot(x - p, y - p) <= tol * scale**2 * x.size
    # distance no larger than the (SLSQP) reference's
    assert np.linalg.norm(x - p) <= np.linalg.norm(x - ref) + tol * scale * x.size


dtypes = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])


# --------------------------------------------------------------------------
# property tests of each projection
# --------------------------------------------------------------------------


@dtypes
@SETTINGS
@given(x=vectors, total=positive, seed=seeds)
def test_simplex_properties(dtype, x, total, seed):
    x = x.astype(dtype).astype(np.float64)  # the point the projection sees
    c = hc.simplex(total=total)
    out = c(jnp.asarray(x, dtype))
    assert out.dtype == dtype and out.shape == x.shape
    p = np.asarray(out, np.float64)

    def is_feasible(y, tol):
        return y.min() >= 0 and abs(y.sum() - total) <= tol

    ys = feasible_simplex(np.random.default_rng(seed), x.size, total, 8)
    check_projection(c, x, p, slsqp_simplex(x, total), ys, is_feasible, dtype)
    scale = 1.0 + np.abs(x).max() + total
    np.testing.assert_allclose(p, ref_simplex(x, total), rtol=0, atol=TOL[dtype] * scale * x.size)


@dtypes
@SETTINGS
@given(x=vectors, radius=positive, seed=seeds)
def test_l1_ball_properties(dtype, x, radius, seed):
    x = x.astype(dtype).astype(np.float64)
    c = hc.l1_ball(radius)
    out = c(jnp.asarray(x, dtype))
    assert out.dtype == dtype and out.shape == x.shape
    p = np.asarray(out, np.float64)

    def is_feasible(y, tol):
        return np.abs(y).sum() <= radius + tol

    ys = feasible_l1_ball(np.random.default_rng(seed), x.size, radius, 8)
    check_projection(c, x, p, slsqp_l1_ball(x, radius), ys, is_feasible, dtype)
    scale = 1.0 + np.abs(x).max() + radius
    np.testing.assert_allclose(p, ref_l1_ball(x, radius), rtol=0, atol=TOL[dtype] * scale * x.size)


@dtypes
@SETTINGS
@given(x=vectors, data=st.data(), seed=seeds)
def test_box_l1_properties(dtype, x, data, seed):
    x = x.astype(dtype).astype(np.float64)
    lo, hi, radius = data.draw(box_l1_params(x.size))
    c = hc.box_l1(lo, hi, radius)
    out = c(jnp.asarray(x, dtype))
    assert out.dtype == dtype and out.shape == x.shape
    p = np.asarray(out, np.float64)
    # bounds as the dtype sees them
    lo_d, hi_d = float(dtype(lo)), float(dtype(hi))

    def is_feasible(y, tol):
        return y.min() >= lo_d - tol and y.max() <= hi_d + tol and y.sum() <= radius + tol

    ys = feasible_box_l1(np.random.default_rng(seed), x.size, lo, hi, radius, 8)
    check_projection(c, x, p, slsqp_box_l1(x, lo, hi, radius), ys, is_feasible, dtype)
    scale = 1.0 + np.abs(x).max() + radius
    np.testing.assert_allclose(
        p, ref_box_l1(x, lo, hi, radius), rtol=0, atol=TOL[dtype] * scale * x.size
    )


@SETTINGS
# XLA flushes subnormals to zero, so keep the bounds normal numbers
@given(
    x=vectors,
    lo=st.floats(-5, 5, allow_subnormal=False),
    width=st.floats(0, 5, allow_subnormal=False),
)
def test_box_and_nonnegative_are_clips(x, lo, width):
    hi = lo + width
    np.testing.assert_array_equal(hc.box(lo, hi)(jnp.asarray(x)), np.clip(x, lo, hi))
    np.testing.assert_array_equal(hc.box(-np.inf, hi)(jnp.asarray(x)), np.minimum(x, hi))
    np.testing.assert_array_equal(hc.nonnegative()(jnp.asarray(x)), np.maximum(x, 0))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_large_inputs_are_exact(dtype):
    """n = 2000, with ties and a wide range: close to the exact reference."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(2000) * 3.0
    x[:50] = 1.25  # ties
    x = x.astype(dtype).astype(np.float64)
    tol = {np.float64: 1e-12, np.float32: 1e-6}[dtype]
    cases = [
        (hc.simplex(10.0), ref_simplex(x, 10.0)),
        (hc.l1_ball(50.0), ref_l1_ball(x, 50.0)),
        (hc.box_l1(0.0, 1.0, 300.0), ref_box_l1(x, 0.0, 1.0, 300.0)),
        (hc.box_l1(0.05, np.inf, 500.0), ref_box_l1(x, 0.05, np.inf, 500.0)),
    ]
    for c, ref in cases:
        p = np.asarray(c(jnp.asarray(x, dtype)), np.float64)
        assert np.abs(p - ref).max() <= tol * np.abs(x).max(), c
    # the sum constraints hold to the same relative accuracy
    p = np.asarray(hc.box_l1(0.0, 1.0, 300.0)(jnp.asarray(x, dtype)), np.float64)
    assert abs(p.sum() - 300.0) <= tol * 300.0 * 10
    p = np.asarray(hc.simplex(10.0)(jnp.asarray(x, dtype)), np.float64)
    assert abs(p.sum() - 10.0) <= tol * 10.0 * 10


def test_box_l1_tight_set_is_a_single_point():
    # n·lo = radius: the only feasible point is lo everywhere.
    x = jnp.array([3.0, -1.0, 0.5, 2.0])
    np.testing.assert_allclose(hc.box_l1(0.25, 1.0, 1.0)(x), np.full(4, 0.25), atol=1e-15)


# --------------------------------------------------------------------------
# feasible points, shapes and dtypes
# --------------------------------------------------------------------------


def test_feasible_points_are_unchanged():
    rng = np.random.default_rng(1)
    inside_l1 = jnp.asarray(feasible_l1_ball(rng, 7, 2.0, 1)[0])
    assert np.array_equal(hc.l1_ball(2.0)(inside_l1), inside_l1)
    inside_bl1 = jnp.asarray(feasible_box_l1(rng, 7, 0.1, 0.9, 3.0, 1)[0])
    assert np.array_equal(hc.box_l1(0.1, 0.9, 3.0)(inside_bl1), inside_bl1)
    inside_box = jnp.asarray(rng.uniform(-1, 1, 7))
    assert np.array_equal(hc.box(-1.0, 1.0)(inside_box), inside_box)
    assert np.array_equal(hc.nonnegative()(jnp.abs(inside_box)), jnp.abs(inside_box))
    on_simplex = jnp.asarray(feasible_simplex(rng, 7, 3.0, 1)[0])
    np.testing.assert_allclose(hc.simplex(3.0)(on_simplex), on_simplex, rtol=0, atol=1e-15)
    vertex = jnp.array([0.0, 1.0, 0.0])
    assert np.array_equal(hc.simplex()(vertex), vertex)


@pytest.mark.parametrize("shape", [(), (1,), (3, 4), (2, 3, 2)])
@pytest.mark.parametrize(
    "c", [hc.simplex(2.0), hc.l1_ball(1.0), hc.box_l1(0.0, 0.5, 1.5), hc.box(0.0, 1.0)], ids=repr
)
def test_any_shape_is_flattened_and_restored(c, shape):
    x = jnp.asarray(np.random.default_rng(2).normal(size=shape) * 2)
    out = c(x)
    assert out.shape == shape
    np.testing.assert_array_equal(out, np.reshape(c(x.reshape(-1)), shape))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
@pytest.mark.parametrize(
    "c",
    [hc.simplex(), hc.l1_ball(1.0), hc.box_l1(0.0, 0.5, 1.0), hc.box(0.0, 1.0), hc.nonnegative()],
    ids=repr,
)
def test_dtype_is_preserved(c, dtype):
    """Also under x64, where optax ≥ 0.2.5's simplex turns a float32 leaf into float64 and its
    l1-ball rejects one (its lax.cond branches differ in dtype) unless given float64."""
    x = jnp.array([0.7, -0.2, 1.5, 0.3], dtype)
    out = c(x)
    assert out.dtype == dtype
    ref = np.asarray(c(x.astype(jnp.float64)))
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=4 * eps)


def test_default_x32_mode():
    """Users run without x64: float32 leaves, Python-float parameters."""
    x = np.random.default_rng(3).normal(size=50).astype(np.float32) * 2
    with jax.enable_x64(False):
        lam = {"w": jnp.asarray(x), "lr": 1.5}
        outs = {
            "simplex": hc.simplex(2.0, on="w")(lam)["w"],
            "l1": hc.l1_ball(3.0, on="w")(lam)["w"],
            "box_l1": jax.jit(hc.box_l1(0.0, 0.5, 4.0, on="w"))(lam)["w"],
        }
        lr = hc.box(0.0, 1.0, on="lr")(lam)["lr"]
        assert all(o.dtype == jnp.float32 for o in outs.values()) and float(lr) == 1.0
    x = x.astype(np.float64)
    refs = {
        "simplex": ref_simplex(x, 2.0),
        "l1": ref_l1_ball(x, 3.0),
        "box_l1": ref_box_l1(x, 0.0, 0.5, 4.0),
    }
    for name, out in outs.items():
        got = np.asarray(out, np.float64)
        np.testing.assert_allclose(got, refs[name], rtol=0, atol=1e-6, err_msg=name)


def test_python_scalars_and_numpy_leaves_are_accepted():
    out = hc.box(0.0, 1.0)({"lr": 1.5, "m": np.array([-1.0, 0.5])})
    assert float(out["lr"]) == 1.0
    np.testing.assert_array_equal(out["m"], [0.0, 0.5])
    assert float(hc.simplex(2.0)(0.3)) == 2.0  # a scalar "simplex" is the point total


# --------------------------------------------------------------------------
# which part of λ: on=
# --------------------------------------------------------------------------


class Hparams(NamedTuple):
    lr: jax.Array
    weights: jax.Array


def test_default_applies_to_every_leaf_separately():
    lam = {"a": jnp.array([2.0, 0.0]), "b": [jnp.array([1.0, 1.0, 1.0])]}
    out = hc.simplex()(lam)
    np.testing.assert_allclose(out["a"], [1.0, 0.0])
    np.testing.assert_allclose(out["b"][0], [1 / 3] * 3)


def test_on_key_touches_only_that_key():
    lam = {"weights": jnp.array([2.0, -1.0, 0.5]), "lr": jnp.array(-3.0), "steps": 7}
    out = hc.box_l1(0.0, 1.0, 1.2, on="weights")(lam)
    np.testing.assert_allclose(out["weights"], [1.0, 0.0, 0.2])
    assert out["lr"] is lam["lr"] and out["steps"] is lam["steps"]  # untouched, even the int
    # a key whose value is a subtree: every leaf of it
    lam = {"opt": {"lr": jnp.array(-1.0), "mu": jnp.array(2.0)}, "w": jnp.array(-5.0)}
    out = hc.box(0.0, 1.0, on="opt")(lam)
    assert float(out["opt"]["lr"]) == 0.0 and float(out["opt"]["mu"]) == 1.0
    assert out["w"] is lam["w"]


def test_on_function_touches_only_the_picked_leaves():
    lam = Hparams(lr=jnp.array(-1.0), weights=jnp.array([3.0, -2.0]))
    out = hc.nonnegative(on=lambda h: h.lr)(lam)
    assert isinstance(out, Hparams)
    assert float(out.lr) == 0.0 and out.weights is lam.weights

    lam = {"a": jnp.array([2.0, 0.0]), "b": jnp.array([0.0, 4.0]), "c": jnp.array([5.0, 5.0])}
    out = hc.simplex(on=lambda t: (t["a"], t["b"]))(lam)
    np.testing.assert_allclose(out["a"], [1.0, 0.0])  # each leaf separately
    np.testing.assert_allclose(out["b"], [0.0, 1.0])
    assert out["c"] is lam["c"]
    # picking the same leaf twice projects it once
    out = hc.box(0.0, 1.0, on=lambda t: [t["c"], t["c"]])(lam)
    np.testing.assert_array_equal(out["c"], [1.0, 1.0])


def test_on_errors():
    lam = {"w": jnp.ones(3)}
    with pytest.raises(KeyError, match="on='v' is not a key of λ"):
        hc.box(0.0, 1.0, on="v")(lam)
    with pytest.raises(TypeError, match="must be a dict"):
        hc.box(0.0, 1.0, on="w")([jnp.ones(3)])
    with pytest.raises(TypeError, match="must select"):
        hc.box(0.0, 1.0, on=lambda t: t["w"] * 2)(lam)
    with pytest.raises(TypeError, match="not one of λ's leaves"):
        hc.box(0.0, 1.0, on=lambda t: jnp.ones(2))(lam)
    with pytest.raises(TypeError, match="dtype int"):
        hc.box(0.0, 1.0)({"w": jnp.ones(3), "steps": 7})


# --------------------------------------------------------------------------
# chain, jit, repr, immutability
# --------------------------------------------------------------------------


def test_chain_applies_in_order():
    x = jnp.array([2.0, 0.5, -3.0])
    a, b = hc.box(0.0, 1.0), hc.l1_ball(1.0)
    np.testing.assert_array_equal(hc.chain(a, b)(x), b(a(x)))
    np.testing.assert_array_equal(hc.chain(b, a)(x), a(b(x)))
    assert not np.allclose(b(a(x)), a(b(x)))  # the order matters here
    assert np.array_equal(hc.chain()(x), x)
    lam = {"w": x, "lr": jnp.array(2.0)}
    out = hc.chain(hc.simplex(on="w"), hc.box(0.0, 1.0, on="lr"))(lam)
    np.testing.assert_allclose(out["w"], hc.simplex()(x))
    assert float(out["lr"]) == 1.0
    with pytest.raises(TypeError, match="callable"):
        hc.chain(hc.box(0.0, 1.0), 3.0)


@pytest.mark.parametrize(
    "c",
    [
        hc.simplex(on="w"),
        hc.l1_ball(0.5, on=lambda t: t["w"]),
        hc.box_l1(0.1, 1.0, 1.0, on="w"),
        hc.chain(hc.box(0.0, 1.0, on="lr"), hc.nonnegative(on="w")),
    ],
    ids=repr,
)
def test_jit(c):
    lam = {"w": jnp.array([[0.3, -2.0], [1.5, 0.2]]), "lr": jnp.array(1.7)}
    eager, jitted = c(lam), jax.jit(c)(lam)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-15), eager, jitted)
    # constraints are hashable, so they can also be static arguments
    static = jax.jit(lambda lam, c: c(lam), static_argnums=1)(lam, c)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-15), eager, static)


def test_box_l1_empty_set_is_reported_under_jit():
    c = hc.box_l1(0.5, 1.0, 1.0)  # fine for n ≤ 2, empty for n = 3
    c(jnp.ones(2))
    with pytest.raises(ValueError, match=r"empty .* 3 entries"):
        jax.jit(c)(jnp.ones(3))


def test_repr():
    assert repr(hc.box(0, 1)) == "box(lo=0.0, hi=1.0)"
    assert repr(hc.nonnegative()) == "nonnegative()"
    assert repr(hc.nonnegative(on="lr")) == "nonnegative(on='lr')"
    assert repr(hc.simplex()) == "simplex(total=1.0)"
    assert repr(hc.l1_ball(2, on="w")) == "l1_ball(radius=2.0, on='w')"
    assert repr(hc.box_l1(0, 1, 100)) == "box_l1(lo=0.0, hi=1.0, radius=100.0)"

    def weights(lam):
        return lam["weights"]

    assert repr(hc.simplex(on=weights)).startswith("simplex(total=1.0, on=<function ")
    assert "weights" in repr(hc.simplex(on=weights))
    both = hc.chain(hc.box(0, 1), hc.simplex())
    assert repr(both) == "chain(box(lo=0.0, hi=1.0), simplex(total=1.0))"


def test_frozen_and_comparable():
    c = hc.box(0.0, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lo = 2.0
    assert c == hc.box(0, 1) and hash(c) == hash(hc.box(0, 1))
    assert hc.simplex(2.0) != hc.simplex(1.0)
    assert isinstance(c, hc.Constraint) and isinstance(hc.box_l1(0, 1, 1), hc.Constraint)


# --------------------------------------------------------------------------
# vmap (the population driver vmaps the hyper-update) and derivatives
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "c",
    [
        hc.simplex(2.0, on="w"),
        hc.l1_ball(1.0, on="w"),
        hc.box_l1(0.0, 0.5, 1.0, on="w"),
        hc.box(0.0, 1.0),
        hc.nonnegative(on="w"),
    ],
    ids=repr,
)
def test_vmap_projects_each_member(c):
    """Under vmap optax's l1-ball ``lax.cond`` becomes a select: mix members inside and outside."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(3, 2, 4))
    w[0] *= 0.01  # member 0 inside the l1 ball
    lam = {"w": jnp.asarray(w), "lr": jnp.asarray(rng.normal(size=3))}
    batched = jax.vmap(c)(lam)
    for k in range(3):
        one = c(jax.tree.map(lambda a: a[k], lam))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[k], b, rtol=0, atol=1e-15), batched, one)


# no entry of X sits at a kink of the sets below (a bound, or a change of active set)
X = jnp.array([0.9, -0.3, 0.45, 0.1, 1.3])


@pytest.mark.parametrize(
    "c",
    [hc.simplex(2.0), hc.l1_ball(1.0), hc.box_l1(0.0, 0.5, 1.0), hc.box(0.0, 1.0), hc.nonnegative()],
    ids=repr,
)
def test_derivatives_match_finite_differences(c):
    check_grads(c, (X,), order=1, modes=("fwd", "rev"), eps=1e-6)


@pytest.mark.parametrize(
    "c, hi",
    [(hc.simplex(2.0), np.inf), (hc.l1_ball(1.0), np.inf), (hc.box_l1(0.0, 0.5, 1.0), 0.5)],
    ids=repr,
)
def test_jacobian_is_the_closed_form(c, hi):
    """With the sum active, J = D (diag f − f fᵀ/|F|) D: F the entries strictly inside their
    bounds (f its indicator), D = diag(sign x)."""
    y = np.abs(np.asarray(c(X)))
    f = ((y > 0) & (y < hi)).astype(float)
    d = np.diag(np.sign(np.asarray(X)))
    expected = d @ (np.diag(f) - np.outer(f, f) / f.sum()) @ d
    np.testing.assert_allclose(jax.jacfwd(c)(X), expected, rtol=0, atol=1e-14)
    np.testing.assert_allclose(jax.jacrev(c)(X), expected, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------
# invalid arguments
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: hc.box(1.0, 0.0), "lo must be ≤ hi"),
        (lambda: hc.box(float("nan"), 1.0), "lo must be a number"),
        (lambda: hc.simplex(0.0), "total must be a finite number > 0"),
        (lambda: hc.simplex(-1.0), "total"),
        (lambda: hc.l1_ball(0.0), "radius must be a finite number > 0"),
        (lambda: hc.l1_ball(-2.0), "radius"),
        (lambda: hc.l1_ball(float("inf")), "radius"),
        (lambda: hc.box_l1(0.0, 1.0, 0.0), "radius"),
        (lambda: hc.box_l1(-0.5, 1.0, 1.0), "lo must be ≥ 0"),
        (lambda: hc.box_l1(1.0, 0.5, 1.0), "lo must be ≤ hi"),
    ],
)
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_invalid_at_call_time():
    with pytest.raises(ValueError, match="empty"):
        hc.box_l1(0.5, 1.0, 1.0)(jnp.zeros(3))
    with pytest.raises(ValueError, match="empty leaf"):
        hc.simplex()(jnp.zeros((0,)))
    with pytest.raises(TypeError, match="scalar"):
        hc.box(np.zeros(3), 1.0)
