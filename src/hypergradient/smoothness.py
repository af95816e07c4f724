"""Whether the exact hypergradient describes the trend a hyper-step will see.

An exact hypergradient g = ∇f(λ) is the derivative of the smooth piece of f that λ sits on. A run
with relu or max-pooling makes w_T(λ) piecewise smooth with jumps; a chaotic run makes f rough at
every scale a hyper-step could take. Either way g can be exact and meaningless: the objective's
slope over a step of the hyper-optimizer is something else. :func:`smoothness` measures that slope,

    slope_d(h) = (f(λ + h·d) − f(λ − h·d)) / 2h,     exact_d = gᵀd,

along unit directions d (the descent direction −g/‖g‖ and a few random ones), at steps
h = scale·‖λ‖ over several scales, and compares. All the perturbed runs are one vmapped program.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._pytree import partition, signature
from .dynamics import Dynamics, check_finite
from .errors import Failure
from .hypergrad import ProgramCache, check_types, compiled, raise_failure, trained_objective
from .methods.base import Method, Objective
from .methods.reverse import CHAOS_GROWTH, Reverse
from .precision import matmul_precision

#: The default scales of the steps h = scale·‖λ‖ at which slopes are measured.
SCALES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: What to do where the exact hypergradient cannot be trusted.
REMEDIES = ("use smooth activations (SiLU, GELU, tanh) and average pooling, a shorter horizon (hg.Truncated(k), "
            "hg.online), a lower learning rate, or an evolution-strategy estimator of the smoothed objective "
            "(hg.ES, hg.PES)")


@dataclasses.dataclass(frozen=True, eq=False)
class Smoothness:
    """What :func:`smoothness` measured, and its verdict.

    Attributes:
      ok: whether the exact hypergradient can be trusted: it agrees with every judged slope and
        the backward pass did not grow past ``growth_limit``.
      reason: why not, in words (``""`` when ``ok``).
      value: f(λ).
      grad: the exact hypergradient g, with λ's structure.
      directions: the directions' names (``"-g"``, ``"random 1"``, ...).
      scales: the relative scales; ``steps`` the steps h = scale·‖λ‖ they give.
      exact: gᵀd per direction, shape ``(directions,)``.
      slopes: the central-difference slopes, shape ``(directions, scales)``.
      disagreement: ``|slope − exact| / max(|slope|, |exact|)`` (0: equal, 1: one is 0 or they have
        opposite signs, up to 2), shape ``(directions, scales)``.
      sign_agrees: slope and exact have the same sign, shape ``(directions, scales)``.
      judged: which scales the verdict reads (those within ``step_range``), shape ``(scales,)``.
      backward_growth: max_t ‖α_t‖ / ‖α_T‖ of the backward pass (``None``: the method does not
        measure it).
    """

    ok: bool
    reason: str
    value: float
    grad: Any
    directions: tuple[str, ...]
    scales: tuple[float, ...]
    steps: tuple[float, ...]
    exact: np.ndarray
    slopes: np.ndarray
    disagreement: np.ndarray
    sign_agrees: np.ndarray
    judged: np.ndarray
    backward_growth: float | None

    def __str__(self) -> str:
        growth = "not measured" if self.backward_growth is None else f"{self.backward_growth:.3g}x"
        head = f"smoothness at f(λ) = {self.value:.6g}, ‖g‖ = {abs(self.exact[0]):.4g}; backward growth {growth}"
        scales = (f"s={s:.0e}{'*' if j else ''}" for s, j in zip(self.scales, self.judged))
        table = [("direction", "exact gᵀd", *scales)]
        for name, e, row in zip(self.directions, self.exact, self.slopes):
            table.append((name, f"{e:+.4g}", *(f"{x:+.4g}" for x in row)))
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in table]
        verdict = "ok: the exact hypergradient describes the slopes" if self.ok else f"not ok: {self.reason}; {REMEDIES}"
        note = "(slopes of f over steps h = s·‖λ‖ along each unit direction; *: judged)"
        return "\n".join([head, *lines, note, verdict])


def smoothness(dyn: Dynamics, objective: Objective, lam, *, method: Method | None = None, scales=SCALES,
               random_directions: int = 2, key=None, step_range=(1e-3, 1e-2), factor: float = 3.0,
               floor: float = 0.1, growth_limit: float = CHAOS_GROWTH) -> Smoothness:
    """Check whether the exact hypergradient at λ describes the objective's trend at the scales a
    hyper-step moves.

    Computes g = ∇f(λ) with ``method``, then the central-difference slopes of f along the unit
    directions d = −g/‖g‖ (the direction a hyper-optimizer's step follows) and ``random_directions``
    Gaussian ones, over steps h = scale·‖λ‖ (scale alone where λ = 0) for each of ``scales``, and
    compares each with the exact directional derivative gᵀd.

    The verdict: not ok when, at a judged scale (``step_range[0] <= scale <= step_range[1]``) and
    along some direction, the slope and gᵀd differ by more than ``floor·‖g‖`` and either have
    opposite signs or a ratio beyond ``factor`` (either way); or when the backward pass grew past
    ``growth_limit`` (Reverse's ``stats["backward_growth"]``, the criterion of ``hg.ChaosWarning``),
    or the hypergradient or a slope is not finite. Slopes at smaller scales are reported, not judged:
    there a relu run shows the jumps between smooth pieces (a huge slope) and float32 shows its
    rounding, neither of which a hyper-step sees.

    Cost: one hypergradient (~3 training runs for Reverse) and 2·len(scales)·(1 + random_directions)
    training runs, all in one vmapped program: memory for that many training states at once.

    Args:
      dyn: the training run.
      objective: ``(w, λ) -> scalar`` at the final weights, as for :func:`hypergradient.hypergrad`.
      lam: the hyperparameters (concrete).
      method: how to differentiate (default ``hg.Reverse()``).
      scales: the relative step sizes.
      random_directions: how many random unit directions besides −g/‖g‖.
      key: PRNG key of the random directions (default ``jax.random.PRNGKey(0)``).
      step_range: the range of scales the verdict judges (those a hyper-step moves).
      factor: the largest ratio between slope and gᵀd (either way) that still agrees.
      floor: differences below ``floor·‖g‖`` always agree (a random direction nearly orthogonal to g).
      growth_limit: a larger backward growth is chaos.

    Returns:
      A :class:`Smoothness`; ``print`` it for the table, read ``.ok``.

    Raises:
      DivergenceError: training at λ itself diverged (see :func:`hypergradient.hypergrad`).
    """
    method = Reverse() if method is None else method
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive numbers, got {scales!r}")
    if random_directions < 0:
        raise ValueError(f"random_directions must be >= 0, got {random_directions}")
    if not any(step_range[0] <= s <= step_range[1] for s in scales):
        raise ValueError(f"step_range {step_range!r} holds none of the scales {scales!r}: nothing would be judged")
    if not factor >= 1:
        raise ValueError(f"factor is the largest ratio that agrees, at least 1; got {factor!r}")
    check_types(dyn, method)
    check_finite(lam, "hyperparameter")
    method = method.resolve(dyn, lam, objective)
    exe, _, _ = compiled(dyn, objective, method, lam)
    arrays, _ = partition(objective)
    sol = exe(dyn, arrays, lam)
    if Failure(int(sol.result)) in (Failure.TRAINING_DIVERGED, Failure.OBJECTIVE_NONFINITE):
        raise_failure(method, Failure(int(sol.result)), {}, sol, dyn.steps)
    growth = float(sol.stats["backward_growth"]) if "backward_growth" in sol.stats else None

    leaves, treedef = jax.tree.flatten(lam)
    g = [jnp.asarray(x, y.dtype) for x, y in zip(jax.tree.leaves(sol.grad), leaves)]
    g_norm = _norm(g)
    key = jax.random.PRNGKey(0) if key is None else key
    keys = jax.random.split(key, max(1, random_directions))[:random_directions]
    dirs = [[-x / g_norm for x in g] if g_norm > 0 else [jnp.zeros_like(x) for x in g]]
    for k in keys:
        r = [jax.random.normal(kk, jnp.shape(x), x.dtype) for kk, x in zip(jax.random.split(k, len(leaves)), leaves)]
        dirs.append([x / _norm(r) for x in r])
    names = ("-g", *(f"random {i + 1}" for i in range(random_directions)))
    exact = np.array([sum(float(jnp.vdot(a, b)) for a, b in zip(g, d)) for d in dirs])

    lam_norm = _norm(leaves)
    steps = tuple(s * (lam_norm if lam_norm > 0 else 1.0) for s in scales)
    signs = (1.0, -1.0)
    points = [[x + sign * h * v for x, v in zip(leaves, d)] for d in dirs for h in steps for sign in signs]
    batch = jax.tree.unflatten(treedef, [jnp.stack(column) for column in zip(*points)])
    values = np.asarray(_values(dyn, objective, batch), np.float64).reshape(len(dirs), len(steps), 2)
    slopes = (values[..., 0] - values[..., 1]) / (2 * np.asarray(steps))

    e = exact[:, None]
    diff = np.abs(slopes - e)
    disagreement = diff / np.maximum(np.maximum(np.abs(slopes), np.abs(e)), np.finfo(np.float64).tiny)
    sign_agrees = np.sign(slopes) == np.sign(e)
    ratio_ok = np.abs(slopes) * factor >= np.abs(e)
    ratio_ok &= np.abs(e) * factor >= np.abs(slopes)
    agrees = (diff <= floor * g_norm) | (sign_agrees & ratio_ok)
    judged = np.array([step_range[0] <= s <= step_range[1] for s in scales])
    reason = _reason(g_norm, growth, growth_limit, slopes, exact, agrees, judged, sign_agrees, names, scales)
    return Smoothness(not reason, reason, float(sol.value), sol.grad, names, scales, steps, exact, slopes,
                      disagreement, sign_agrees, judged, growth)


def _reason(g_norm, growth, growth_limit, slopes, exact, agrees, judged, sign_agrees, names, scales) -> str:
    """Why the exact hypergradient cannot be trusted (``""``: it can)."""
    if not math.isfinite(g_norm):
        return "the exact hypergradient is not finite (the backward pass overflowed: chaos)"
    if growth is not None and not growth <= growth_limit:
        return (f"the backward pass grew {growth:.3g}x (more than {growth_limit:.3g}x): the run is chaotic in its "
                "weights")
    bad = judged[None, :] & ~(agrees & np.isfinite(slopes))
    if not bad.any():
        return ""
    i, j = map(int, np.argwhere(bad)[0])
    if not np.isfinite(slopes[i, j]):
        return f"the objective is not finite at a step of scale {scales[j]:.0e} along {names[i]}"
    how = "the opposite sign" if not sign_agrees[i, j] else "a different size"
    return (f"along {names[i]} the exact derivative {exact[i]:+.3g} has {how} from the slope "
            f"{slopes[i, j]:+.3g} over a step of scale {scales[j]:.0e}")


def _norm(leaves) -> float:
    """‖x‖ over the leaves, scaled by the largest entry so that squaring 1e24 in float32 does not overflow."""
    top = max((float(jnp.max(jnp.abs(x))) for x in leaves if jnp.size(x)), default=0.0)
    if top == 0 or not math.isfinite(top):
        return top
    return top * math.sqrt(sum(float(jnp.sum(jnp.square(x / top))) for x in leaves))


_programs = ProgramCache(16)


def _values(dyn: Dynamics, objective: Objective, batch):
    """f at every λ of ``batch`` (a leading axis on each leaf), one vmapped program of plain training runs."""
    arrays, skeleton = partition(objective)
    key = (signature(dyn), skeleton, signature(arrays), signature(batch), matmul_precision())
    program = _programs.get_or_build(key, lambda: jax.jit(
        lambda d, a, lams: jax.vmap(lambda l: trained_objective(d, skeleton.combine(a), l)[1])(lams)))
    return program(dyn, arrays, batch)
