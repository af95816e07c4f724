"""The coder's integer division against exact integers, on the backend at hand and under a
simulated float division that is not correctly rounded (as a GPU's float32 division is not)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hypergradient.methods import _fixedpoint as fp

jax.config.update("jax_enable_x64", True)


def operands(fmt, signed: bool, wide: bool, n: int = 100_000, seed: int = 0):
    """x and d over the whole range floor_divmod promises (1 <= d <= 2^(B/2), |x/d| below 2^(p−8),
    or 2^(B−2) when wide), with the edge cases: exact multiples and their neighbours, the extremes."""
    B = fmt.bits
    bound = 2 ** (B - 2) if wide else 2 ** (np.finfo(fmt.float_dtype).nmant + 1 - 8)
    rng = np.random.default_rng(seed)
    big_d = 2 ** (B // 2)
    d = np.concatenate([rng.integers(1, 2**13, n), rng.integers(1, big_d, n, endpoint=True), np.ones(n // 10, int)])
    k = rng.integers(-bound + 1 if signed else 0, bound, len(d), dtype=np.int64)  # quotients,
    k[1::2] //= d[1::2]  # half of them small enough that x = k·d stays in range for any d
    # exact multiples k·d (where floor(fl(k·d)/d) most often falls to k − 1) and their neighbours
    x = np.concatenate([k * d, k * d - 1, k * d + 1, k * d + rng.integers(0, d)])
    d = np.tile(d, 4)
    x, d = x.astype(object), d.astype(object)
    lo, hi = (-(2 ** (B - 2)), 2 ** (B - 2)) if signed else (0, 2**B)
    edges = [(0, 1), (1, 1), (0, big_d), (big_d - 1, big_d), (hi - 1, big_d), (hi - 1, big_d - 1),
             (bound - 1, 1), (bound * 3 - 1, 3), (lo, big_d), (lo + 1, big_d - 7)]
    if signed:
        edges += [(-1, 1), (-1, big_d), (-bound + 1, 1), (-bound * 3 + 1, 3)]
    else:  # the top of the unsigned range, with large divisors
        top_d = rng.integers(2 ** (B // 2 - 1), big_d, 1000, endpoint=True)
        edges += [(hi - 1 - j * 12345, int(e)) for j, e in enumerate(top_d)]
    x = np.concatenate([x, np.array([e[0] for e in edges], object)])
    d = np.concatenate([d, np.array([e[1] for e in edges], object)])
    keep = (x >= lo) & (x < hi) & (abs(x // d) < bound)
    dtype = fmt.int_dtype if signed else fmt.uint_dtype
    return np.array(x[keep], dtype), np.array(d[keep], dtype)


def off_by_ulps(q, max_ulps: int):
    """``q`` moved by -max_ulps .. +max_ulps units in the last place, a different amount per element
    (0 stays 0: any division of 0 gives 0)."""
    bits = jax.lax.bitcast_convert_type(q, jnp.int32 if q.dtype == jnp.float32 else jnp.int64)
    moved = jax.lax.bitcast_convert_type(bits + (bits % (2 * max_ulps + 1)) - max_ulps, q.dtype)
    return jnp.where(q == 0, q, moved)


def check_exact(fmt, x, d, wide):
    q, r = jax.jit(functools.partial(fp.floor_divmod, fmt, wide=wide))(jnp.asarray(x), jnp.asarray(d))
    np.testing.assert_array_equal(np.asarray(q), x // d)  # numpy's floor division, exact on integers
    np.testing.assert_array_equal(np.asarray(r), x % d)


CASES = [(dtype, signed, wide) for dtype in ("float32", "float64") for signed in (False, True) for wide in (False, True)]


@pytest.mark.parametrize("dtype, signed, wide", CASES)
def test_floor_divmod_agrees_with_integer_division(dtype, signed, wide):
    fmt = fp.format_for(dtype)
    x, d = operands(fmt, signed, wide)
    assert len(x) > 300_000
    check_exact(fmt, x, d, wide)


@pytest.mark.parametrize("ulps", [1, 3, 126])
@pytest.mark.parametrize("dtype, signed, wide", CASES)
def test_floor_divmod_is_exact_when_the_division_is_not_correctly_rounded(monkeypatch, dtype, signed, wide, ulps):
    # 126 ulp is the bound floor_divmod's docstring proves for float32 (float64's is 2^20)
    monkeypatch.setattr(fp, "_divide", lambda a, b: off_by_ulps(a / b, ulps))
    fmt = fp.format_for(dtype)
    x, d = operands(fmt, signed, wide, n=30_000, seed=ulps)
    check_exact(fmt, x, d, wide)


def test_the_first_estimate_is_off_by_more_than_one_and_corrected(monkeypatch):
    """The float estimate alone is wrong by many units for large quotients (24 bits of mantissa for
    a 30-bit quotient), more so with an inexact division: the integer corrections do the work."""
    monkeypatch.setattr(fp, "_divide", lambda a, b: off_by_ulps(a / b, 3))
    fmt = fp.format_for("float32")
    x, d = operands(fmt, signed=True, wide=True, n=30_000)
    first = np.floor(np.asarray(off_by_ulps(jnp.asarray(x, jnp.float32) / jnp.asarray(d, jnp.float32), 3)))
    assert np.max(np.abs(first.astype(np.int64) - x.astype(np.int64) // d)) > 3
    check_exact(fmt, x, d, wide=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mul_and_its_inverse_round_trip_with_an_inexact_division(monkeypatch, dtype):
    monkeypatch.setattr(fp, "_divide", lambda a, b: off_by_ulps(a / b, 3))
    fmt = fp.format_for(dtype)
    rng = np.random.default_rng(2)
    size = 50_000
    v = rng.integers(-fmt.limit + 1, fmt.limit, size).astype(fmt.int_dtype)
    n = rng.integers(1, 2**fmt.mu_bits, size, endpoint=True).astype(fmt.uint_dtype)
    s = (rng.integers(0, 2**62, size) % n).astype(fmt.uint_dtype)

    @jax.jit
    def round_trip(v, n, s):
        v1, e = fp.mul(fmt, v, n, s)
        return fp.mul_inverse(fmt, v1, e, n)

    v0, s0 = round_trip(v, n, s)
    np.testing.assert_array_equal(np.asarray(v0), v)
    np.testing.assert_array_equal(np.asarray(s0), s)
