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
import math

import jax
import jax.numpy as jnp

from ..dynamics import State
from ..optim import broadcast_to
from ..errors import Failure, MethodError, ReversalError
from . import _fixedpoint as fp
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
        has_v = dyn.optimizer.reversal != "sgd"
        heavy = dyn.optimizer.reversal == "heavy_ball"
        T = dyn.steps

        # The integer state, the buffer and per-weight hyperparameters are one flat vector over all
        # leaves: the fixed-point and coder code then appears once in the program, not once per leaf
        # (fewer, larger operations; a fraction of the compile time).
        s0 = dyn.initial_state(lam)
        leaves0, treedef = jax.tree.flatten(s0.params)
        shapes = [jnp.shape(x) for x in leaves0]
        dtypes = {jnp.result_type(x) for x in leaves0}
        if len(dtypes) != 1:
            raise MethodError(f"Reversible needs all weights in one float dtype, got {sorted(map(str, dtypes))}")
        fmt = fp.format_for(dtypes.pop(), self.frac_bits)
        sizes = [math.prod(sh) for sh in shapes]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        total = sum(sizes)

        def flat(tree):
            # in-place slice updates, not a concatenate: XLA:CPU fuses a concatenate with its
            # producers into one loop that picks the operand per element (10x a copy here)
            leaves = treedef.flatten_up_to(tree)
            out = jnp.zeros(total, jnp.result_type(*leaves))
            for x, o in zip(leaves, offsets):
                out = jax.lax.dynamic_update_slice(out, jnp.reshape(x, -1).astype(out.dtype), (o,))
            return out

        def to_tree(ints):
            x = fp.to_float(fmt, ints)
            return jax.tree.unflatten(treedef, [x[o : o + n].reshape(sh) for o, n, sh in zip(offsets, sizes, shapes)])

        def per_weight(value, key, derive=lambda x: (x, 0)):
            """``derive(value) = (arrays, count)`` per layer (once for a scalar): the arrays laid out
            over the flat weights, the counts summed.

            Deriving before broadcasting keeps the integer divisions of a per-layer momentum's
            coder alphabet at one per layer instead of one per weight.
            """
            if jax.tree_util.treedef_is_leaf(jax.tree.structure(value)) and jnp.ndim(value) == 0:
                broadcast_to(value, s0.params, key)  # validates like the optimizer does
                return derive(jnp.asarray(value, fmt.float_dtype))
            parts = [derive(jnp.asarray(v, fmt.float_dtype)) for v in jax.tree.leaves(broadcast_to(value, s0.params, key))]
            # a concatenate here, unlike flat(): fused into its consumers, the broadcasts are never
            # materialised (slice updates as in flat() made B1 26% slower)
            lay_out = lambda *xs: jnp.concatenate(  # noqa: E731
                [jnp.broadcast_to(x, sh).reshape(-1) for x, sh in zip(xs, shapes)]
            )
            return jax.tree.map(lay_out, *[arrays for arrays, _ in parts]), sum(count for _, count in parts)

        def momentum_terms(mu):
            n, bad = fp.rational(fmt, mu)
            return (mu, fp.alphabet(fmt, n)), bad

        def hparams(t):
            """(lr, μ, μ's coder alphabet, count of μ out of range) at step t, laid out over the flat weights."""
            hp = dyn.hparams(lam, t)
            lr, _ = per_weight(hp["lr"], "lr")
            if not has_v:
                return lr, None, None, jnp.zeros((), jnp.int32)
            (mu, n), bad = per_weight(hp["momentum"], "momentum", momentum_terms)
            return lr, mu, n, jnp.asarray(bad, jnp.int32)

        def velocity_increment(mu, g):
            return fp.to_fixed(fmt, g if heavy else (1 - mu) * g)

        def gradient(w, t):
            loss, g = dyn.loss_and_grad(to_tree(w), lam, t)
            return loss, flat(g).astype(fmt.float_dtype)

        words = fp.capacity_words(fmt, T * (max_bits if has_v else fmt.bits))
        w0, bad0 = fp.to_fixed(fmt, flat(s0.params))
        bad0 = bad0.astype(jnp.int32)
        v0 = jnp.zeros_like(w0)
        buf0 = fp.empty(fmt, total, words)

        # -- forward: the fixed-point training run ---------------------------------
        def forward(carry, t):
            w, v, buf, bad_range, bad_mu = carry
            w_in = w
            loss, g = gradient(w, t)
            lr, mu, n, bmu = hparams(t)
            if has_v:
                buf, s = fp.decode(fmt, buf, n)
                v, e = fp.mul(fmt, v, n.c, s)
                buf = fp.encode_pow2(fmt, buf, e, fmt.mu_bits)
                dv, b1 = velocity_increment(mu, g)
                v, b2 = fp.add(fmt, v, dv)
                u, b3 = fp.to_fixed(fmt, lr * fp.to_float(fmt, v))
                bad = b1 + b2 + b3
            else:
                u, bad = fp.to_fixed(fmt, lr * g)
                buf = fp.push_raw(fmt, buf, u)
                dv = u
            w, b4 = fp.add(fmt, w, -u)
            bad_range = bad_range + (bad + b4).astype(jnp.int32)
            return (w, v, buf, bad_range, bad_mu + bmu), (loss, checksums(w_in, dv))

        zero = jnp.zeros((), jnp.int32)
        (wT, vT, bufT, bad_range, bad_mu), (losses, sums) = jax.lax.scan(
            forward, (w0, v0, buf0, bad0, zero), jnp.arange(T)
        )

        # -- objective and its gradient at the final weights -----------------------
        paramsT = to_tree(wT)
        value, obj_vjp = jax.vjp(objective, paramsT, lam)
        dE_dw, grad = obj_vjp(jnp.ones_like(value))
        alpha = State(dE_dw, jax.tree.map(jnp.zeros_like, dE_dw) if has_v else ())

        # -- backward: re-create s_t from s_{t+1}, and take the step's VJP there ----
        def backward(carry, t):
            w, v, buf, alpha, grad = carry
            lr, mu, n, _ = hparams(t)
            if has_v:
                u, _ = fp.to_fixed(fmt, lr * fp.to_float(fmt, v))
            else:
                buf, u = fp.pop_raw(fmt, buf)
            w = w + u
            params = to_tree(w)
            # Φ_t = update(∇L_t(w), v, w, λ): linearise the gradient once; its primal value also
            # re-creates v_t, so the backward pass evaluates ∇L_t once per step.
            (loss, g_tree), grad_vjp = jax.vjp(lambda p, lam: dyn.loss_and_grad(p, lam, t), params, lam)
            if has_v:
                dv, _ = velocity_increment(mu, flat(g_tree).astype(fmt.float_dtype))
                v = v - dv
                buf, e = fp.decode_pow2(fmt, buf, fmt.mu_bits)
                v, s = fp.mul_inverse(fmt, v, e, n.c)
                buf = fp.encode(fmt, buf, s, n)
                opt_state = to_tree(v)
            else:
                dv = u  # popped, not recomputed: sgd's reversal does not depend on the gradient
                opt_state = ()

            def update(g, opt_state, params, lam):
                return State(*dyn.optimizer.update(g, opt_state, params, dyn.hparams(lam, t)))

            _, update_vjp = jax.vjp(update, g_tree, opt_state, params, lam)
            dg, dv_state, dw, dlam = update_vjp(alpha)
            dw2, dlam2 = grad_vjp((jnp.zeros_like(loss), dg))
            alpha = State(jax.tree.map(jnp.add, dw, dw2), dv_state)
            grad = jax.tree.map(lambda a, b, c: a + b + c, grad, dlam, dlam2)
            return (w, v, buf, alpha, grad), checksums(w, dv)

        (w_back, v_back, buf_back, alpha, grad), sums_back = jax.lax.scan(
            backward, (wT, vT, bufT, alpha, grad), jnp.arange(T), reverse=True
        )
        _, init_vjp = jax.vjp(dyn.initial_state, lam)
        (dlam,) = init_vjp(alpha)
        grad = jax.tree.map(jnp.add, grad, dlam)

        mismatch = (jnp.sum(w_back != w0) + jnp.sum(v_back != 0) + jnp.sum(~fp.is_empty(fmt, buf_back))).astype(jnp.int32)
        # the step at which the backward pass left the forward trajectory (the last that differs: it is met
        # first), and whether its weights were still the forward's there, only the gradient not
        differs = sums != sums_back  # (T, 2): weights, increment
        departed = jnp.max(jnp.where(differs[:, 0] | differs[:, 1], jnp.arange(T), -1))
        at = jnp.maximum(departed, 0)
        gradient_first = (departed >= 0) & ~differs[at, 0] & differs[at, 1]
        bits = fp.stored_bits(fmt, bufT)
        state_bytes = total * jnp.dtype(fmt.float_dtype).itemsize * (2 if has_v else 1)
        buffer_bytes = float(buf0.stack.size * fmt.word_bytes + total * (fmt.bits // 8 + 4))  # past int32 at long T
        stats = {
            "bits_per_weight_per_step": jnp.mean(bits) / T,
            "bits_needed_per_step": jnp.max(bits) / T,
            "buffer_bytes": buffer_bytes,
            "buffer_bytes_used": jnp.sum(jnp.maximum(bits, 0)) / 8,
            "trajectory_bytes_equivalent": float(T * state_bytes),
            "exact_reversal": (mismatch == 0).astype(fmt.float_dtype),
            "reversal_error": mismatch,
            "reversal_departed_at_step": departed,
            "range_overflow": bad_range,
            "buffer_overflow": bufT.overflow,
            "buffer_underflow": bufT.underflow + buf_back.underflow,
            "momentum_out_of_range": bad_mu,
            "frac_bits": fmt.frac_bits,
            "momentum_bits": fmt.mu_bits,
            "fixed_point_range": fmt.value_range,
        }
        stats = {k: jnp.asarray(v) for k, v in stats.items()}
        failures = [  # the first that applies names the run's failure
            (bad_range, Failure.RANGE_OVERFLOW),
            (bad_mu, Failure.MOMENTUM_OUT_OF_RANGE),
            (bufT.overflow, Failure.BUFFER_OVERFLOW),
            (mismatch + bufT.underflow + buf_back.underflow,
             jnp.where(gradient_first, Failure.GRADIENT_NOT_REPRODUCED, Failure.REVERSAL_MISMATCH)),
        ]
        result = jnp.asarray(Failure.OK, jnp.int32)
        for count, code in reversed(failures):
            result = jnp.where(count != 0, jnp.asarray(code, jnp.int32), result)
        return solution(value, grad, paramsT, losses, stats, result)


@jax.jit
def _mean_max_momentum_bits(dyn, lam):
    """mean over steps of max over weights of log2(1/μ_t): the buffer's growth per weight per step, at most."""
    dtype = jax.tree.leaves(jax.eval_shape(dyn.initial_params, lam))[0].dtype
    floor = 2.0 ** -fp.format_for(dtype).mu_bits  # the smallest μ the run can represent (below: out of range)

    def bits(t):
        mu = jax.tree.leaves(dyn.hparams(lam, t)["momentum"])
        return jnp.max(jnp.stack([jnp.max(-jnp.log2(jnp.clip(jnp.asarray(m, jnp.float32), floor, 1.0))) for m in mu]))

    return jnp.mean(jax.vmap(bits)(jnp.arange(dyn.steps)))


def checksums(w, dv):
    """Sums (wrapping) of the integer weights a step's gradient is taken at and of the increment made
    from that gradient: where the backward pass's differ from the forward's, it left the forward
    trajectory, through its integer arithmetic (weights differ) or a gradient not reproduced (only
    the increment differs)."""
    return jnp.stack([jnp.sum(w, dtype=w.dtype), jnp.sum(dv, dtype=w.dtype)])
