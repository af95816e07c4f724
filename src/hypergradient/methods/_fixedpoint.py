"""Exactly reversible fixed-point arithmetic and the information buffer of ``Reversible``.

Maclaurin, Duvenaud & Adams (2015) make SGD with momentum exactly reversible
by running it on integers (fixed point, radix 2^-k) and keeping the bits that
the multiplication of the velocity by μ destroys. This module provides the
three pieces, vectorised over the D weights and traceable under ``jit`` with
fixed shapes:

- ``Format``: the integer representation. float32 runs use int32 words with
  22 fractional bits (range ±2^8 = ±256, resolution 2.4e-7); float64 runs use
  int64 with 44 fractional bits (range ±2^18, resolution 5.7e-14). JAX has no
  int64 unless x64 is enabled, and a float64 run implies it is, so the width
  follows the weights' float dtype. Values are kept below 2^(B-2) in
  magnitude (B the word width) so that the sum of two stored values can never
  wrap; anything larger is clipped and flagged, never wrapped.
- The buffer: one ANS (asymmetric numeral systems) coder per weight, a head
  ``x`` in [L, 2^S) plus a stack of w-bit words, together one big integer
  that symbols are pushed onto (``encode``) and popped from (``decode``) in
  O(1), each the exact inverse of the other. An alphabet of c symbols costs
  log2(c) bits (up to a quantisation of the frequencies to 2^m). Each push or
  pop moves at most one stack word (S − w = m), so it is one batched scatter or
  gather over the D weights.
- ``mul``: v ← μ v exactly reversibly with μ = n / 2^b ("bits back"): pop
  s ∈ [0, n) from the buffer, z = v·n + s, v' = ⌊z / 2^b⌋, push z mod 2^b.
  v' is μ v stochastically rounded (error < 1 unit), and the buffer grows by
  b − log2(n) = log2(1/μ) bits, the information the multiplication destroys.
  ``mul_inverse`` undoes it.

Every table below is a static Python int; every array op is on the format's
own integer dtypes, whose ranges the comments justify.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import is_int


class Format(NamedTuple):
    """A fixed-point format and the matching ANS coder (all static).

    Attributes:
      float_dtype, int_dtype, uint_dtype, word_dtype: the dtypes involved.
      bits: B, the width of the integers (32 or 64).
      frac_bits: k, the radix is 2^-k.
      mu_bits: b, momenta are rationals n / 2^b with 1 <= n <= 2^b.
      state_bits: S, width of the ANS head (= B).
      word_bits: w, width of a stack word.
      prob_bits: m, the coder's frequencies sum to 2^m (m = S − w: a push or pop moves
        at most one word).
    """

    float_dtype: Any
    int_dtype: Any
    uint_dtype: Any
    word_dtype: Any
    bits: int
    frac_bits: int
    mu_bits: int
    state_bits: int
    word_bits: int
    prob_bits: int

    @property
    def limit(self) -> int:
        """Magnitude bound of every stored integer: 2^(B-2)."""
        return 1 << (self.bits - 2)

    @property
    def value_range(self) -> float:
        """The largest representable magnitude, 2^(B-2-k)."""
        return float(2.0 ** (self.bits - 2 - self.frac_bits))

    @property
    def resolution(self) -> float:
        return float(2.0 ** -self.frac_bits)

    @property
    def lower(self) -> int:
        """L: the head lives in [L, 2^S)."""
        return 1 << (self.state_bits - self.word_bits)

    @property
    def word_bytes(self) -> int:
        return self.word_bits // 8

    def u(self, x):
        return jnp.asarray(x, self.uint_dtype)

    def i(self, x):
        return jnp.asarray(x, self.int_dtype)


def format_for(float_dtype, frac_bits: int | None = None) -> Format:
    """The fixed-point format for weights of ``float_dtype`` (float32 or float64)."""
    float_dtype = np.dtype(float_dtype)
    if float_dtype == np.float64:
        if not jax.config.jax_enable_x64:
            raise ValueError("float64 weights need jax_enable_x64")
        # S=64, w=32, m=32: alphabets up to 2^28 (>= 2^4 frequency each).
        fmt = Format(jnp.float64, jnp.int64, jnp.uint64, jnp.uint32, 64, 44, 28, 64, 32, 32)
    elif float_dtype == np.float32:
        # S=32, w=16, m=16; momenta n / 2^13, so alphabets up to 2^13 (>= 8 slots per symbol:
        # near-uniform, which keeps a pop near log2(c) bits even when the buffer's content is
        # not random, e.g. for a weight whose velocity stays 0: at μ = 0.9 such a weight
        # costs 0.17 bits per step, the others log2(1/μ) = 0.15).
        fmt = Format(jnp.float32, jnp.int32, jnp.uint32, jnp.uint16, 32, 22, 13, 32, 16, 16)
    else:
        raise ValueError(f"Reversible runs float32 or float64 weights, got {float_dtype}")
    if frac_bits is not None:
        if not is_int(frac_bits) or not 1 <= frac_bits <= fmt.bits - 4:
            raise ValueError(f"frac_bits must be an int in [1, {fmt.bits - 4}] for {float_dtype} weights, got {frac_bits!r}")
        fmt = fmt._replace(frac_bits=int(frac_bits))
    return fmt


# -- fixed point ------------------------------------------------------------------

def to_float(fmt: Format, x):
    return x.astype(fmt.float_dtype) * jnp.asarray(fmt.resolution, fmt.float_dtype)


def to_fixed(fmt: Format, x):
    """round(x · 2^k) and a count of entries out of range (clipped to 0, never wrapped)."""
    y = jnp.round(jnp.asarray(x, fmt.float_dtype) * jnp.asarray(2.0**fmt.frac_bits, fmt.float_dtype))
    ok = jnp.abs(y) < fmt.limit  # False for NaN and inf too
    return jnp.where(ok, y, 0).astype(fmt.int_dtype), jnp.sum(~ok)


def add(fmt: Format, a, b):
    """a + b for |a|, |b| < 2^(B-2) (cannot wrap); clipped and counted if the sum leaves the range."""
    c = a + b
    ok = jnp.abs(c) < fmt.limit
    return jnp.where(ok, c, jnp.clip(c, -fmt.limit + 1, fmt.limit - 1)), jnp.sum(~ok)


def rational(fmt: Format, mu):
    """n = round(μ · 2^b) as the coder's unsigned type, and a count of μ outside [2^-b, 1]."""
    y = jnp.round(jnp.asarray(mu, fmt.float_dtype) * jnp.asarray(2.0**fmt.mu_bits, fmt.float_dtype))
    ok = (y >= 1) & (y <= 2**fmt.mu_bits)
    return jnp.where(ok, y, 1).astype(fmt.uint_dtype), jnp.sum(~ok)


def _divide(a, b):
    """a / b in floating point: the backend's division, correctly rounded or not (a GPU's float32
    division is not); :func:`floor_divmod` is exact either way."""
    return a / b


def floor_divmod(fmt: Format, x, d, wide: bool = False):
    """(⌊x / d⌋, x mod d), exactly, for integers x of the format's types (signed or unsigned) and
    divisors 1 <= d <= 2^(B/2), with quotients below 2^(p−8) in magnitude (p = 24 or 53, the float's
    precision), or below 2^(B−2) when ``wide``.

    x86 has no vector integer division, so the quotient is estimated by a float division and the
    estimate corrected in exact integer arithmetic. With u = 2^-p and the backend's division within
    K ulp (relative error <= 2K·u; conversions are correctly rounded everywhere), an estimate
    ⌊fl(y) / d⌋ is within |y/d|·η + 1 of y/d, η = (2K + 2)·u. Then:

    - |x/d| < 2^(p−8): |x/d|·η < (2K + 2)/256 < 1, so the estimate is ⌊x/d⌋ or off by one and
      r = x − q·d (computed modulo 2^B) lies in [−d, 2d): one correction step each way ends it.
    - ``wide``: r0 = x − q0·d has |r0| <= |x|·η + d < 2^(B−1), exact as a signed integer, and a
      second estimate of r0/d is off by at most 2^B·η² + η < 1 of it, which leaves the case above.

    Both hold for K <= 126 in float32 formats (2^B·η² < 1 with B = 32, p = 24) and K < 2^20 in
    float64 formats: far beyond any backend's division.
    """
    fd = d.astype(fmt.float_dtype)
    d_int = d.astype(fmt.int_dtype)

    def estimate(y):  # ⌊y / d⌋ up to the error above, as a signed integer
        return jnp.floor(_divide(y.astype(fmt.float_dtype), fd)).astype(fmt.int_dtype)

    q = estimate(x)
    r = (x - q.astype(x.dtype) * d).astype(fmt.int_dtype)
    if wide:
        q1 = estimate(r)
        q, r = q + q1, r - q1 * d_int
    low = r < 0
    q, r = jnp.where(low, q - 1, q), jnp.where(low, r + d_int, r)
    high = r >= d_int
    q, r = jnp.where(high, q + 1, q), jnp.where(high, r - d_int, r)
    return q.astype(x.dtype), r.astype(x.dtype)


def mul(fmt: Format, v, n, s):
    """Forward v ← (v·n + s) // 2^b, returning the remainder e = (v·n + s) mod 2^b to push.

    With v = q·2^b + r: v·n + s = q·n·2^b + (r·n + s) and r·n + s < 2^b·n <= 2^(2b),
    which fits the unsigned type (2b <= S), so nothing is computed in double width.
    """
    b = fmt.mu_bits
    q = jax.lax.shift_right_arithmetic(v, fmt.i(b))
    r = (v & fmt.i((1 << b) - 1)).astype(fmt.uint_dtype)
    z = r * n + s
    v = q * n.astype(fmt.int_dtype) + jax.lax.shift_right_logical(z, fmt.u(b)).astype(fmt.int_dtype)
    return v, z & fmt.u((1 << b) - 1)


def mul_inverse(fmt: Format, v, e, n):
    """Inverse of :func:`mul`: from v' and the popped e recover v and the symbol s to push back."""
    b = fmt.mu_bits
    # v'·2^b + e = v·n + s with s < n: with v' = q·n + k, v = q·2^b + ⌊(k·2^b + e) / n⌋
    q, k = floor_divmod(fmt, v, n.astype(fmt.int_dtype), wide=True)  # |v'| < 2^(B−2): the stored range
    z = jax.lax.shift_left(k.astype(fmt.uint_dtype), fmt.u(b)) | e  # < n·2^b <= 2^(2b)
    zq, zr = floor_divmod(fmt, z, n)
    return q * fmt.i(1 << b) + zq.astype(fmt.int_dtype), zr


# -- the information buffer: one ANS coder per weight ------------------------------

class Buffer(NamedTuple):
    """Per-weight big integers: head (D,), stack (D, rows) of words, stack pointer (D,).

    ``overflow`` / ``underflow`` count words that did not fit / were missing.
    """

    head: jax.Array
    stack: jax.Array
    sp: jax.Array
    overflow: jax.Array
    underflow: jax.Array


PREFILL = 2  # zero words the buffer starts with, so a first pop never reads below the bottom


def empty(fmt: Format, size: int, capacity_words: int) -> Buffer:
    return Buffer(
        head=jnp.full((size,), fmt.lower, fmt.uint_dtype),
        stack=jnp.zeros((size, PREFILL + capacity_words), fmt.word_dtype),
        sp=jnp.full((size,), PREFILL, jnp.int32),
        overflow=jnp.zeros((), jnp.int32),
        underflow=jnp.zeros((), jnp.int32),
    )


class Alphabet(NamedTuple):
    """c symbols with near-uniform frequencies summing to 2^m: q + 1 for the first r, q for the rest.

    Built by :func:`alphabet`; computing (q, r) needs integer divisions, so callers with few
    distinct alphabets (one per layer) build them small and broadcast the result.
    """

    c: jax.Array
    q: jax.Array
    r: jax.Array


def alphabet(fmt: Format, c) -> Alphabet:
    c = fmt.u(c)
    total = fmt.u(1 << fmt.prob_bits)
    return Alphabet(c, total // c, total % c)


# stack[j, i[j]] for every weight j, as one batched gather / scatter
_word_at = jax.vmap(lambda words, i: words[i])
_set_word_at = jax.vmap(lambda words, i, w: words.at[i].set(w, mode="drop"))


def _push(fmt: Format, buf: Buffer, f, cum, divmod_f) -> Buffer:
    """rANS encode of a symbol with frequency f and cumulative frequency cum (out of 2^m)."""
    m, rows = fmt.prob_bits, buf.stack.shape[1]
    x = buf.head
    # renormalise: emit the low word while x >= x_max = 2^(S-m)·f (once is enough as S − w = m)
    emit = jax.lax.shift_right_logical(x, fmt.u(fmt.state_bits - m)) >= f
    fits = buf.sp < rows
    word = (x & fmt.u((1 << fmt.word_bits) - 1)).astype(fmt.word_dtype)
    stack = _set_word_at(buf.stack, jnp.where(emit & fits, buf.sp, rows), word)  # row `rows`: dropped
    x = jnp.where(emit, jax.lax.shift_right_logical(x, fmt.u(fmt.word_bits)), x)
    quotient, remainder = divmod_f(x)
    return Buffer(
        head=jax.lax.shift_left(quotient, fmt.u(m)) + cum + remainder,
        stack=stack,
        sp=buf.sp + emit.astype(jnp.int32),
        overflow=buf.overflow + jnp.sum(emit & ~fits).astype(jnp.int32),
        underflow=buf.underflow,
    )


def _refill(fmt: Format, buf: Buffer, x) -> Buffer:
    """Renormalise after a decode: read a word if the head is below L."""
    read = x < fmt.lower
    present = buf.sp > 0
    word = jnp.where(present, _word_at(buf.stack, jnp.maximum(buf.sp - 1, 0)), 0).astype(fmt.uint_dtype)
    return buf._replace(
        head=jnp.where(read, jax.lax.shift_left(x, fmt.u(fmt.word_bits)) | word, x),
        sp=buf.sp - (read & present).astype(jnp.int32),
        underflow=buf.underflow + jnp.sum(read & ~present).astype(jnp.int32),
    )


def encode(fmt: Format, buf: Buffer, s, c) -> Buffer:
    """Push symbol s ∈ [0, c) of an alphabet of c <= 2^b symbols (log2 c bits); c may be an :class:`Alphabet`."""
    s = fmt.u(s)
    _, q, r = c if isinstance(c, Alphabet) else alphabet(fmt, c)
    f = q + (s < r).astype(fmt.uint_dtype)
    cum = s * q + jnp.minimum(s, r)
    return _push(fmt, buf, f, cum, lambda x: floor_divmod(fmt, x, f))  # x < 2^w·f: quotient < 2^w


def decode(fmt: Format, buf: Buffer, c):
    """Pop a symbol of an alphabet of c symbols: the exact inverse of :func:`encode`."""
    m = fmt.prob_bits
    _, q, r = c if isinstance(c, Alphabet) else alphabet(fmt, c)
    x = buf.head
    slot = x & fmt.u((1 << m) - 1)
    # the first r symbols own q+1 slots each (from 0), the others q (from r·(q+1))
    first = slot < r * (q + 1)
    s, _ = floor_divmod(fmt, jnp.where(first, slot, slot - r), jnp.where(first, q + 1, q))
    f = q + (s < r).astype(fmt.uint_dtype)
    cum = s * q + jnp.minimum(s, r)
    x = f * jax.lax.shift_right_logical(x, fmt.u(m)) + slot - cum
    return _refill(fmt, buf, x), s


def encode_pow2(fmt: Format, buf: Buffer, s, bits: int) -> Buffer:
    """:func:`encode` for an alphabet of 2^bits symbols: shifts instead of divisions."""
    k = fmt.prob_bits - bits
    s = fmt.u(s)
    mask = fmt.u((1 << k) - 1)
    divmod_f = lambda x: (jax.lax.shift_right_logical(x, fmt.u(k)), x & mask)  # noqa: E731
    return _push(fmt, buf, fmt.u(1 << k), jax.lax.shift_left(s, fmt.u(k)), divmod_f)


def decode_pow2(fmt: Format, buf: Buffer, bits: int):
    """:func:`decode` for an alphabet of 2^bits symbols."""
    m = fmt.prob_bits
    k = m - bits
    x = buf.head
    slot = x & fmt.u((1 << m) - 1)
    s = jax.lax.shift_right_logical(slot, fmt.u(k))
    x = jax.lax.shift_left(jax.lax.shift_right_logical(x, fmt.u(m)), fmt.u(k)) + (slot & fmt.u((1 << k) - 1))
    return _refill(fmt, buf, x), s


_RAW_BITS = 16  # raw integers are pushed in 16-bit symbols (m >= 16 in every format)


def push_raw(fmt: Format, buf: Buffer, v) -> Buffer:
    """Push a whole signed integer (B bits) as B/16 symbols of 16 bits."""
    u = jax.lax.bitcast_convert_type(v, fmt.uint_dtype)
    for j in range(fmt.bits // _RAW_BITS):
        chunk = jax.lax.shift_right_logical(u, fmt.u(_RAW_BITS * j)) & fmt.u((1 << _RAW_BITS) - 1)
        buf = encode_pow2(fmt, buf, chunk, _RAW_BITS)
    return buf


def pop_raw(fmt: Format, buf: Buffer):
    """Inverse of :func:`push_raw`."""
    u = jnp.zeros(buf.head.shape, fmt.uint_dtype)
    for j in reversed(range(fmt.bits // _RAW_BITS)):
        buf, chunk = decode_pow2(fmt, buf, _RAW_BITS)
        u = u | jax.lax.shift_left(chunk, fmt.u(_RAW_BITS * j))
    return buf, jax.lax.bitcast_convert_type(u, fmt.int_dtype)


def stored_bits(fmt: Format, buf: Buffer):
    """Information held per weight beyond the empty buffer, in bits (measured from the fill)."""
    head_bits = jnp.log2(buf.head.astype(jnp.float64 if fmt.bits == 64 else jnp.float32))
    return (buf.sp - PREFILL).astype(head_bits.dtype) * fmt.word_bits + head_bits - (fmt.state_bits - fmt.word_bits)


def is_empty(fmt: Format, buf: Buffer):
    """Per-weight: is the buffer back in its initial state?"""
    return (buf.head == fmt.lower) & (buf.sp == PREFILL)


def capacity_words(fmt: Format, bits: float) -> int:
    """Stack words per weight that hold ``bits`` bits, with the transient slack of one push."""
    return int(math.ceil(bits / fmt.word_bits)) + 2
