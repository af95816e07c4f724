"""Reversible: exact reverse-mode hypergradients without storing the trajectory.

Maclaurin, Duvenaud & Adams (2015). The training run is carried out on
integers (fixed point, radix 2^-k), where SGD with momentum is exactly
invertible once the bits destroyed by v ← μv are kept:

    forward, step t:   g = ∇L_t(w)
                       v ← μ_t v        (exact: μ_t = n/2^b, "bits back" through the buffer)
                       v ← v + ⌊c_t g⌉  (c_t = 1, or 1 − μ_t when dampened)
                       w ← w − ⌊η_t v⌉
    backward, step t:  w ← w + ⌊η_t v⌉, g = ∇L_t(w), v ← v − ⌊c_t g⌉, v ← v / μ_t,

each ⌊·⌉ computed by the same code on the same integers both ways, so every
w_t, v_t is re-created bit for bit. On the way back the Reverse-HG recursion

    α_T = ∂E/∂s_T,  g = ∂E/∂λ;  for t = T..1: g += α_t B_t, α_{t-1} = α_t A_t;  g += α_0 ∂s_0/∂λ

runs with the vector-Jacobian products of the (float) step Φ_t at the
re-created states. The hypergradient is that of the fixed-point training run.

Memory: the weights, the velocity and the information buffer, about
log2(1/μ) bits per weight per step (0.15 at μ = 0.9) instead of the 2·32
bits per weight per step of a stored trajectory. Plain SGD has no exact
inverse (the step's gradient is taken at the point being recovered), so for
``sgd`` the buffer keeps each step's integer update: exact, but a full word
per weight per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..dynamics import State
from ..errors import Failure, MethodError, ReversalError
from . import _fixedpoint as fp
from ._layout import Layout
from .base import Method, solution

#: The buffer's capacity when λ is traced (under ``jit`` / ``vmap``) and cannot size it: enough for
#: momenta down to 0.5.
TRACED_BITS_PER_STEP = 1.0


@dataclasses.dataclass(frozen=True)
class Reversible(Method):
    """Exact reverse-mode hypergradient by reversing the training run in fixed point.

    Serves the optimizers that declare an exact inverse (``Optimizer.reversal``):
    ``hg.optim.sgd()``, ``hg.optim.momentum()`` and
    ``hg.optim.momentum(dampen=True)``, with any hyperparameters (per-step,
    per-layer or per-weight learning rates and momenta in [2^-b, 1], loss,
    init and data hyperparameters).

    Args:
      max_bits_per_step: capacity of the information buffer, in bits per
        weight per step, averaged over the run. The buffer needs about
        log2(1/μ) (1 at μ = 0.5, 0.15 at μ = 0.9). ``None`` (default): sized
        from the momentum schedule at the λ of the call, 1.25·mean_t
        max_weights log2(1/μ_t) + 0.05 rounded up to a power of two (0.25
        at μ = 0.9), so that a new λ rarely needs a new program; under
        ``jit`` or ``vmap``, where λ is traced, 1.0 (momenta down to 0.5). Plain
        ``sgd`` ignores it (a full word per step). A run that needs more
        raises :class:`ReversalError` naming the value to give.
      frac_bits: fractional bits k of the fixed-point weights and velocity
        (default 22 for float32, in int32: range ±256, resolution 2.4e-7;
        44 for float64, in int64: range ±2^18, resolution 5.7e-14).

    The run follows the rounded dynamics: momenta become n/2^b (b = 13 for
    float32, resolution 1.2e-4; b = 28 for float64, 3.7e-9), v ← μv is
    rounded stochastically to the integer grid, increments to nearest. Where
    the hypergradient is chaotic in λ (B1 at T >= 1000, where moving μ by 2e-5
    changes Reverse's own hypergradient), that rounding matters in float32; use
    float64 weights there (B1, T = 1000: cosine 1.000000 with Reverse).

    ``stats`` gains ``bits_per_weight_per_step`` (measured from the buffer's
    fill), ``buffer_bytes`` (allocated), ``buffer_bytes_used``,
    ``trajectory_bytes_equivalent`` (the T·d states Reverse would keep),
    ``exact_reversal`` (1.0 when w_0, v_0 and the empty buffer were
    re-created bit for bit), ``reversal_departed_at_step`` (the step at which
    the backward pass left the forward trajectory, -1 if none; a gradient not
    reproduced there is ``Failure.GRADIENT_NOT_REPRODUCED``, integers gone
    wrong ``Failure.REVERSAL_MISMATCH``) and the error counts ``reversal_error``,
    ``range_overflow``, ``buffer_overflow``, ``momentum_out_of_range``
    (all 0 in a good run; ``Solution.result`` holds the failure otherwise, and
    :func:`hypergradient.hypergrad` raises :class:`ReversalError`).
    """

    max_bits_per_step: float | None = None
    frac_bits: int | None = None

    def __post_init__(self):
        b = self.max_bits_per_step
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0):
            raise ValueError(f"max_bits_per_step must be a positive number or None, got {b!r}")

    def resolve(self, dyn, lam, objective=None) -> Reversible:
        """Size the buffer from the concrete momentum schedule (when ``max_bits_per_step`` is None)."""
        if self.max_bits_per_step is not None:
            return self
        self.check(dyn)
        if dyn.optimizer.reversal == "sgd":
            return dataclasses.replace(self, max_bits_per_step=1.0)  # unused: sgd stores full words
        try:
            bits = float(_mean_max_momentum_bits(dyn, lam))
        except KeyError:  # traced once per dynamics: name the missing hyperparameter, as compiling would
            dyn.validate(lam)
            raise
        needed = 1.25 * bits + 0.05
        return dataclasses.replace(self, max_bits_per_step=2.0 ** math.ceil(math.log2(needed)))

    def resolve_members(self, dyn, members, objective=None) -> Reversible:
        """The buffer of the member whose momenta destroy the most bits."""
        return max((self.resolve(dyn, lam) for lam in members), key=lambda r: r.max_bits_per_step)

    def check(self, dyn) -> None:
        if dyn.carries_state:
            raise MethodError(
                "Reversible reverses the weights and the velocity exactly, and cannot undo a model state's update "
                "(BatchNorm's running averages lose information): use hg.Reverse(checkpoint_every=...), "
                "hg.Forward() or hg.Truncated(k)"
            )
        if dyn.optimizer.reversal is None:
            raise MethodError(
                f"Reversible needs sgd or momentum (heavy ball or dampened); {dyn.optimizer.name} has no exact "
                "inverse: use hg.Reverse(checkpoint_every=...), hg.Forward(), hg.Truncated(k) or "
                "hg.DrMAD() (approximate)"
            )

    def failure(self, result, stats) -> ReversalError | None:
        """The :class:`ReversalError` that explains ``result``, with the run's ``stats``."""
        get = lambda k: float(stats.get(k, 0))  # noqa: E731
        if result == Failure.RANGE_OVERFLOW:
            return ReversalError(
                f"Reversible: {int(get('range_overflow'))} weight, velocity or update values left the "
                f"fixed-point range ±{get('fixed_point_range'):g} (frac_bits={int(get('frac_bits'))}); "
                "give Reversible(frac_bits=...) fewer fractional bits, or rescale the problem"
            )
        if result == Failure.MOMENTUM_OUT_OF_RANGE:
            return ReversalError(
                f"Reversible: a momentum outside [2^-{int(get('momentum_bits'))}, 1] cannot be reversed "
                "exactly; keep μ in that range or use hg.Reverse(checkpoint_every=...)"
            )
        if result == Failure.BUFFER_OVERFLOW:
            need = get("bits_needed_per_step")
            return ReversalError(
                f"Reversible: the information buffer overflowed (it holds {self.max_bits_per_step or TRACED_BITS_PER_STEP:g} bits "
                f"per weight per step; this run needs about {need:.3g}, i.e. log2(1/μ)); "
                f"use Reversible(max_bits_per_step={1.25 * need:.3g}) or more"
            )
        step = int(get("reversal_departed_at_step"))
        lost = (
            f"Reversible: the backward pass did not re-create the initial state bit for bit "
            f"({int(get('reversal_error'))} mismatched integers"
            + (f"; it left the forward trajectory at step {step}): " if step >= 0 else "): ")
        )
        if result == Failure.GRADIENT_NOT_REPRODUCED:
            return ReversalError(
                lost + "there the loss gradient at bit-identical weights differed from the forward pass's. "
                "Reversal needs the gradient to be a deterministic function of (w, λ, t) in both loops: a "
                "loss that draws fresh random numbers breaks it, and so does a backend that computes the "
                "same product differently in the two loops (a GPU's matrix-product algorithms); use "
                "hg.Reverse(checkpoint_every=...)"
            )
        if result == Failure.REVERSAL_MISMATCH:
            return ReversalError(
                lost + "the integers went wrong with the gradients reproduced: this backend's arithmetic is "
                "not the exact inverse the coder needs (integers modulo 2^B, float division within 126 ulp "
                "in float32); use hg.Reverse(checkpoint_every=...)"
            )
        return None

    def value_and_grad(self, dyn, objective, lam):
        self.check(dyn)
        max_bits = TRACED_BITS_PER_STEP if self.max_bits_per_step is None else self.max_bits_per_step
        s0 = dyn.initial_state(lam)
        run = Run.of(dyn, lam, s0.params, self.frac_bits)
        fmt, T, total = run.fmt, dyn.steps, run.layout.total

        words = fp.capacity_words(fmt, T * (max_bits if run.momentum else fmt.bits))
        w0, bad0 = fp.to_fixed(fmt, run.layout.flat(s0.params))
        bad0 = bad0.astype(jnp.int32)
        start = ForwardCarry(w0, jnp.zeros_like(w0), fp.empty(fmt, total, words), bad0, jnp.zeros((), jnp.int32))
        end, (losses, sums) = jax.lax.scan(functools.partial(forward_step, run), start, jnp.arange(T))

        paramsT = run.weights(end.w)
        value, obj_vjp = jax.vjp(objective, paramsT, lam)
        dE_dw, grad = obj_vjp(jnp.ones_like(value))
        alpha = State(dE_dw, jax.tree.map(jnp.zeros_like, dE_dw) if run.momentum else ())
        back = BackwardCarry(end.w, end.v, end.buf, alpha, grad)
        back, sums_back = jax.lax.scan(functools.partial(backward_step, run), back, jnp.arange(T), reverse=True)
        _, init_vjp = jax.vjp(dyn.initial_state, lam)
        (dlam,) = init_vjp(back.alpha)
        grad = jax.tree.map(jnp.add, back.grad, dlam)

        mismatch = mismatches(fmt, w0, back)
        departed, gradient_first = departure(sums, sums_back)
        stats = run_stats(run, end, back, mismatch, departed)
        return solution(value, grad, paramsT, losses, stats, result_of(end, back, mismatch, gradient_first))


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """What the forward and the backward loop share: the training run at λ, the fixed-point
    format, the flat layout of the weights, and the optimizer's form (``momentum``: there is a
    velocity; ``heavy``: its increment is g, not (1 − μ)g)."""

    dyn: Any
    lam: Any
    fmt: fp.Format
    layout: Layout
    momentum: bool
    heavy: bool

    @classmethod
    def of(cls, dyn, lam, params, frac_bits) -> Run:
        dtypes = {jnp.result_type(x) for x in jax.tree.leaves(params)}
        if len(dtypes) != 1:
            raise MethodError(f"Reversible needs all weights in one float dtype, got {sorted(map(str, dtypes))}")
        fmt = fp.format_for(dtypes.pop(), frac_bits)
        reversal = dyn.optimizer.reversal
        return cls(dyn, lam, fmt, Layout.of(params), reversal != "sgd", reversal == "heavy_ball")

    def weights(self, ints):
        """The float weights (or velocity) of a flat integer vector."""
        return self.layout.unflatten(fp.to_float(self.fmt, ints))

    def gradient(self, w, t):
        """(L_t, ∇L_t) at the integer weights w, the gradient flat."""
        loss, g, _ = self.dyn.loss_and_grad(self.weights(w), self.lam, t)
        return loss, self.layout.flat(g).astype(self.fmt.float_dtype)

    def hparams(self, t):
        """(η_t, μ_t, μ_t's coder alphabet, count of μ_t out of range), laid out over the flat weights."""
        hp = self.dyn.hparams(self.lam, t)
        lr, _ = self.layout.per_weight(hp["lr"], "lr", self.fmt.float_dtype)
        if not self.momentum:
            return lr, None, None, jnp.zeros((), jnp.int32)
        (mu, n), bad = self.layout.per_weight(hp["momentum"], "momentum", self.fmt.float_dtype, self._momentum_terms)
        return lr, mu, n, jnp.asarray(bad, jnp.int32)

    def _momentum_terms(self, mu):
        n, bad = fp.rational(self.fmt, mu)
        return (mu, fp.alphabet(self.fmt, n)), bad

    def increment(self, mu, g):
        """⌊c_t g⌉ and its count out of range: c_t = 1 (heavy ball) or 1 − μ_t (dampened)."""
        return fp.to_fixed(self.fmt, g if self.heavy else (1 - mu) * g)


class ForwardCarry(NamedTuple):
    """The forward loop's carry: integer weights and velocity, the buffer, the error counts."""

    w: jax.Array
    v: jax.Array
    buf: fp.Buffer
    range_overflow: jax.Array
    momentum_out_of_range: jax.Array


def forward_step(run: Run, carry: ForwardCarry, t):
    """Step t of the fixed-point run: v ← μ_t v with the bits it destroys pushed onto the buffer,
    v ← v + ⌊c_t g⌉, w ← w − ⌊η_t v⌉ (sgd: the update itself is pushed). Also returns L_t and
    the step's :func:`checksums`."""
    fmt = run.fmt
    w, v, buf, bad_range, bad_mu = carry
    loss, g = run.gradient(w, t)
    lr, mu, n, bmu = run.hparams(t)
    if run.momentum:
        buf, s = fp.decode(fmt, buf, n)
        v, e = fp.mul(fmt, v, n.c, s)
        buf = fp.encode_pow2(fmt, buf, e, fmt.mu_bits)
        dv, b1 = run.increment(mu, g)
        v, b2 = fp.add(fmt, v, dv)
        u, b3 = fp.to_fixed(fmt, lr * fp.to_float(fmt, v))
        bad = b1 + b2 + b3
    else:
        u, bad = fp.to_fixed(fmt, lr * g)
        buf = fp.push_raw(fmt, buf, u)
        dv = u
    w_next, b4 = fp.add(fmt, w, -u)
    bad_range = bad_range + (bad + b4).astype(jnp.int32)
    return ForwardCarry(w_next, v, buf, bad_range, bad_mu + bmu), (loss, checksums(w, dv))


class BackwardCarry(NamedTuple):
    """The backward loop's carry: s_t re-created as integers with the buffer, α_t and g."""

    w: jax.Array
    v: jax.Array
    buf: fp.Buffer
    alpha: State
    grad: Any


def backward_step(run: Run, carry: BackwardCarry, t):
    """Undo step t (w ← w + ⌊η_t v⌉, v ← (v − ⌊c_t g⌉) / μ_t, the buffer's bits popped back), then
    g += α_t B_t, α_{t-1} = α_t A_t at the re-created s_{t-1}."""
    fmt = run.fmt
    w, v, buf, alpha, grad = carry
    lr, mu, n, _ = run.hparams(t)
    if run.momentum:
        u, _ = fp.to_fixed(fmt, lr * fp.to_float(fmt, v))
    else:
        buf, u = fp.pop_raw(fmt, buf)
    w = w + u
    params = run.weights(w)
    # Φ_t = update(∇L_t(w), v, w, λ): linearise the gradient once; its primal value also
    # re-creates v_t, so the backward pass evaluates ∇L_t once per step.
    (loss, g), grad_vjp = jax.vjp(lambda p, lam: run.dyn.loss_and_grad(p, lam, t)[:2], params, run.lam)
    if run.momentum:
        dv, _ = run.increment(mu, run.layout.flat(g).astype(fmt.float_dtype))
        v = v - dv
        buf, e = fp.decode_pow2(fmt, buf, fmt.mu_bits)
        v, s = fp.mul_inverse(fmt, v, e, n.c)
        buf = fp.encode(fmt, buf, s, n)
        opt_state = run.weights(v)
    else:
        dv = u  # popped, not recomputed: sgd's reversal does not depend on the gradient
        opt_state = ()

    def update(g, opt_state, params, lam):
        return State(*run.dyn.optimizer.update(g, opt_state, params, run.dyn.hparams(lam, t)))

    _, update_vjp = jax.vjp(update, g, opt_state, params, run.lam)
    dg, dv_state, dw, dlam = update_vjp(alpha)
    dw2, dlam2 = grad_vjp((jnp.zeros_like(loss), dg))
    alpha = State(jax.tree.map(jnp.add, dw, dw2), dv_state)
    grad = jax.tree.map(lambda a, b, c: a + b + c, grad, dlam, dlam2)
    return BackwardCarry(w, v, buf, alpha, grad), checksums(w, dv)


def checksums(w, dv):
    """Sums (wrapping) of the integer weights a step's gradient is taken at and of the increment made
    from that gradient: where the backward pass's differ from the forward's, it left the forward
    trajectory, through its integer arithmetic (weights differ) or a gradient not reproduced (only
    the increment differs)."""
    return jnp.stack([jnp.sum(w, dtype=w.dtype), jnp.sum(dv, dtype=w.dtype)])


def mismatches(fmt: fp.Format, w0, back: BackwardCarry):
    """How many integers of w_0, v_0 = 0 and the empty buffer the backward pass did not re-create."""
    return (jnp.sum(back.w != w0) + jnp.sum(back.v != 0) + jnp.sum(~fp.is_empty(fmt, back.buf))).astype(jnp.int32)


def departure(sums, sums_back):
    """The step at which the backward pass left the forward trajectory (the last whose checksums
    differ: it is met first; -1 if none), and whether its weights were still the forward's there,
    only the gradient not."""
    differs = sums != sums_back  # (T, 2): weights, increment
    departed = jnp.max(jnp.where(differs[:, 0] | differs[:, 1], jnp.arange(sums.shape[0]), -1))
    at = jnp.maximum(departed, 0)
    return departed, (departed >= 0) & ~differs[at, 0] & differs[at, 1]


def run_stats(run: Run, end: ForwardCarry, back: BackwardCarry, mismatch, departed) -> dict:
    """The figures of ``Reversible``'s ``stats`` (its docstring names them)."""
    fmt, T, total = run.fmt, run.dyn.steps, run.layout.total
    bits = fp.stored_bits(fmt, end.buf)
    state_bytes = total * jnp.dtype(fmt.float_dtype).itemsize * (2 if run.momentum else 1)
    buffer_bytes = float(end.buf.stack.size * fmt.word_bytes + total * (fmt.bits // 8 + 4))  # past int32 at long T
    stats = {
        "bits_per_weight_per_step": jnp.mean(bits) / T,
        "bits_needed_per_step": jnp.max(bits) / T,
        "buffer_bytes": buffer_bytes,
        "buffer_bytes_used": jnp.sum(jnp.maximum(bits, 0)) / 8,
        "trajectory_bytes_equivalent": float(T * state_bytes),
        "exact_reversal": (mismatch == 0).astype(fmt.float_dtype),
        "reversal_error": mismatch,
        "reversal_departed_at_step": departed,
        "range_overflow": end.range_overflow,
        "buffer_overflow": end.buf.overflow,
        "buffer_underflow": end.buf.underflow + back.buf.underflow,
        "momentum_out_of_range": end.momentum_out_of_range,
        "frac_bits": fmt.frac_bits,
        "momentum_bits": fmt.mu_bits,
        "fixed_point_range": fmt.value_range,
    }
    return {k: jnp.asarray(v) for k, v in stats.items()}


def result_of(end: ForwardCarry, back: BackwardCarry, mismatch, gradient_first):
    """The run's :class:`Failure`: the first of these counts that is not 0 names it."""
    failures = [
        (end.range_overflow, Failure.RANGE_OVERFLOW),
        (end.momentum_out_of_range, Failure.MOMENTUM_OUT_OF_RANGE),
        (end.buf.overflow, Failure.BUFFER_OVERFLOW),
        (mismatch + end.buf.underflow + back.buf.underflow,
         jnp.where(gradient_first, Failure.GRADIENT_NOT_REPRODUCED, Failure.REVERSAL_MISMATCH)),
    ]
    result = jnp.asarray(Failure.OK, jnp.int32)
    for count, code in reversed(failures):
        result = jnp.where(count != 0, jnp.asarray(code, jnp.int32), result)
    return result


@jax.jit
def _mean_max_momentum_bits(dyn, lam):
    """mean over steps of max over weights of log2(1/μ_t): the buffer's growth per weight per step, at most."""
    dtype = jax.tree.leaves(jax.eval_shape(dyn.initial_params, lam))[0].dtype
    floor = 2.0 ** -fp.format_for(dtype).mu_bits  # the smallest μ the run can represent (below: out of range)

    def bits(t):
        mu = jax.tree.leaves(dyn.hparams(lam, t)["momentum"])
        return jnp.max(jnp.stack([jnp.max(-jnp.log2(jnp.clip(jnp.asarray(m, jnp.float32), floor, 1.0))) for m in mu]))

    return jnp.mean(jax.vmap(bits)(jnp.arange(dyn.steps)))

