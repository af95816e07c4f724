"""Constraints on the hyperparameters: exact Euclidean projections.

A constraint is a small frozen object, callable as ``c(lam) -> lam``: it maps
the hyperparameter pytree λ to the nearest point (in the Euclidean norm) of a
convex set. The drivers apply it after each hyper-step (projected
hypergradient descent, as in Franceschi et al. 2017)::

    import hypergradient as hg

    c = hg.constraints.chain(
        hg.constraints.box(0.0, 1.0, on="momentum"),
        hg.constraints.box_l1(0.0, 1.0, radius=500.0, on="weights"),
    )
    lam = c(lam)

Sets, and what computes each:

- ``box(lo, hi)``: ``lo ≤ x_i ≤ hi``, elementwise (bounds may be infinite);
  ``optax.projections.projection_box``;
- ``nonnegative()``: ``x_i ≥ 0``; ``optax.projections.projection_non_negative``;
- ``simplex(total=1.0)``: ``x_i ≥ 0, Σ x_i = total``;
  ``optax.projections.projection_simplex`` (optax ≥ 0.2.3);
- ``l1_ball(radius)``: ``Σ |x_i| ≤ radius``;
  ``optax.projections.projection_l1_ball`` (optax ≥ 0.2.4);
- ``box_l1(lo, hi, radius)``: ``lo ≤ x_i ≤ hi, Σ x_i ≤ radius`` with
  ``0 ≤ lo``, so that ``Σ x_i = Σ |x_i|`` (the per-example weights of data
  hyper-cleaning); optax has no such set, so it is solved here.

Which part of λ a constraint governs: every leaf by default; with
``on=key`` the subtree ``lam[key]`` (λ must then be a dict); with
``on=picker`` (a function such as ``lambda lam: lam["weights"]``) the leaves
the picker selects. The picker is only ever called on a stand-in tree whose
leaves are placeholders, so it must *select* (index, attribute access, build
tuples or dicts of parts), not compute. The selection becomes a mask of λ's
shape, as in ``optax.masked``; leaves outside it are returned untouched (the
very same objects).

``box`` and ``nonnegative`` act elementwise. ``simplex``, ``l1_ball`` and
``box_l1`` couple the entries of an array, and they project **each selected
leaf separately** (an optax projection of a whole tree would couple all its
leaves): ``simplex(on=lambda lam: (lam["a"], lam["b"]))`` makes ``lam["a"]``
and ``lam["b"]`` each sum to one; it does not make them sum to one together.
A leaf of any shape is accepted, and of any floating dtype: the coupling sets
compute in the widest float JAX has enabled and cast back, because from optax
0.2.5 on the simplex divides by an integer count, which promotes to that float,
and the l1-ball's ``lax.cond`` then rejects a narrower leaf under x64. Every
projection is pure ``jax.numpy``, jit- and vmap-compatible and differentiable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from optax import projections

__all__ = [
    "Box",
    "BoxL1",
    "Chain",
    "Constraint",
    "L1Ball",
    "Nonnegative",
    "Simplex",
    "box",
    "box_l1",
    "chain",
    "l1_ball",
    "nonnegative",
    "simplex",
]

PyTree = Any
#: ``None`` (every leaf), a key of λ (a dict), or a function picking part of λ.
Selector = None | Hashable | Callable[[PyTree], PyTree]

# Jitted with the parameter traced, so one compilation per shape and dtype
# serves every total and radius (and an eager lax.cond is not rebuilt per call).
_simplex = jax.jit(projections.projection_simplex)
_l1_ball = jax.jit(projections.projection_l1_ball)

# Bisection steps for box_l1. Each halves the bracket of the threshold τ; the
# exact solve on the active set that follows only needs the bracket to be
# narrow enough to identify that set, which 100 steps give in float64 (and
# float32 stalls earlier at adjacent floats, harmlessly).
_BISECTION_STEPS = 100


@jax.jit
def _box_l1(x: jax.Array, lo: jax.Array, hi: jax.Array, radius: jax.Array) -> jax.Array:
    """Projection of ``x`` (any shape) onto ``{lo ≤ y ≤ hi, Σ y ≤ radius}``.

    KKT: ``y = clip(x − τ, lo, hi)`` with ``τ ≥ 0`` and ``τ (Σ y − radius) = 0``.
    If ``clip(x, lo, hi)`` already satisfies the sum constraint, ``τ = 0``.
    Otherwise ``g(τ) = Σ clip(x − τ, lo, hi)`` is continuous, non-increasing,
    ``g(0) > radius`` and ``g(max x − lo) = n·lo ≤ radius``: bisection brackets
    the root, then the root is solved exactly on the bracket's active set
    (``g`` is linear between breakpoints). The bracket only identifies that
    set, so derivatives flow through the exact solve alone:
    ``∂τ/∂x_i = 1/|F|`` for the free entries ``F``.
    """
    clipped = jnp.clip(x, lo, hi)
    feasible = jnp.sum(clipped) <= radius
    x_value = jax.lax.stop_gradient(x)

    def g(tau):
        return jnp.sum(jnp.clip(x_value - tau, lo, hi))

    def bisect(_, bracket):
        a, b = bracket
        m = 0.5 * (a + b)
        too_big = g(m) > radius
        return jnp.where(too_big, m, a), jnp.where(too_big, b, m)

    zero = jnp.zeros((), x.dtype)
    upper = jnp.maximum(jnp.max(x_value) - lo, zero)
    a, b = jax.lax.fori_loop(0, _BISECTION_STEPS, bisect, (zero, upper))

    z = x - 0.5 * (a + b)
    free = (z > lo) & (z < hi)
    n_free = jnp.sum(free)
    # where(), not count·bound: hi may be infinite with nothing at it.
    fixed = jnp.sum(jnp.where(z >= hi, hi, 0)) + jnp.sum(jnp.where(z <= lo, lo, 0))
    tau_exact = (jnp.sum(jnp.where(free, x, 0)) + fixed - radius) / jnp.maximum(n_free, 1)
    # value: kept inside the bracket against rounding; derivative: the exact solve's
    tau_value = jax.lax.stop_gradient(tau_exact)
    tau = jnp.where(n_free > 0, jnp.clip(tau_value, a, b) + (tau_exact - tau_value), b)
    return jnp.where(feasible, clipped, jnp.clip(x - tau, lo, hi))


def _in_widest_float(project: Callable, x: jax.Array, *params: float) -> jax.Array:
    """``project(x, *params)`` computed in the widest float JAX has enabled, in ``x``'s dtype."""
    work = jnp.promote_types(x.dtype, jax.dtypes.canonicalize_dtype(jnp.float64))
    return project(x.astype(work), *params).astype(x.dtype)


# --------------------------------------------------------------------------
# selection of the leaves a constraint governs
# --------------------------------------------------------------------------


class _Slot:
    """Placeholder for leaf ``index`` of λ, handed to an ``on=`` picker."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"<leaf {self.index} of λ>"


def _mask(lam: PyTree, on: Selector) -> PyTree:
    """λ's structure with ``True`` at the leaves ``on`` selects, ``False`` elsewhere."""
    leaves, treedef = jax.tree_util.tree_flatten(lam)
    if on is None:
        return jax.tree_util.tree_unflatten(treedef, [True] * len(leaves))
    slots = jax.tree_util.tree_unflatten(treedef, [_Slot(i) for i in range(len(leaves))])
    if callable(on):
        try:
            picked = on(slots)
        except TypeError as e:
            raise TypeError(
                f"the on= picker {on!r} must select a part of λ (indexing, attribute "
                f"access), not compute with it; calling it on λ's structure raised: {e}"
            ) from e
    else:
        if not isinstance(lam, Mapping):
            raise TypeError(
                f"on={on!r} names a key, so λ must be a dict; got {type(lam).__name__}. "
                "Pass a function instead, e.g. on=lambda lam: lam.some_part."
            )
        if on not in slots:
            raise KeyError(f"on={on!r} is not a key of λ; its keys are {list(slots)}")
        picked = slots[on]
    selected = set()
    for leaf in jax.tree_util.tree_leaves(picked):
        if not isinstance(leaf, _Slot):
            raise TypeError(
                f"the on= picker {on!r} must return parts of λ, but returned a leaf "
                f"{leaf!r} that is not one of λ's leaves"
            )
        selected.add(leaf.index)
    return jax.tree_util.tree_unflatten(treedef, [i in selected for i in range(len(leaves))])


def _as_float_array(leaf: Any, owner: Constraint) -> jax.Array:
    x = jnp.asarray(leaf)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{owner!r} projects floating-point hyperparameters; got a leaf of dtype {x.dtype}. "
            "Restrict the constraint with on= or make the leaf a float array."
        )
    return x


# --------------------------------------------------------------------------
# constraints
# --------------------------------------------------------------------------


def _format_on(on: Selector) -> str:
    if on is None:
        return ""
    if callable(on):
        name = getattr(on, "__qualname__", None) or repr(on)
        return f", on=<function {name}>"
    return f", on={on!r}"


def _positive_finite(value: Any, what: str, owner: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{owner}: {what} must be a finite number > 0, got {value!r}")
    return v


def _bound(value: Any, what: str, owner: str) -> float:
    if np.ndim(value) != 0:
        raise TypeError(
            f"{owner}: {what} must be a scalar, got an array of shape {np.shape(value)}"
        )
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{owner}: {what} must be a number, got nan")
    return v


def _set_interval(c: Any, owner: str) -> None:
    """Check ``c.lo ≤ c.hi`` (scalars, not NaN) and store them as floats on the frozen ``c``."""
    lo, hi = _bound(c.lo, "lo", owner), _bound(c.hi, "hi", owner)
    if lo > hi:
        raise ValueError(f"{owner}: lo must be ≤ hi, got lo={lo!r} > hi={hi!r}")
    object.__setattr__(c, "lo", lo)
    object.__setattr__(c, "hi", hi)


class Constraint:
    """Base of the projections: ``c(lam) -> lam`` projects the selected leaves.

    Subclasses are frozen dataclasses with an ``on`` field and implement
    ``_project(x)`` on one leaf, a float array of any shape.
    """

    on: Selector

    def __call__(self, lam: PyTree) -> PyTree:
        def project(leaf, selected):
            return self._project(_as_float_array(leaf, self)) if selected else leaf

        return jax.tree.map(project, lam, _mask(lam, self.on))

    def _project(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, repr=False)
class Box(Constraint):
    """``lo ≤ x_i ≤ hi`` elementwise; see :func:`box`."""

    lo: float
    hi: float
    on: Selector = None

    def __post_init__(self):
        _set_interval(self, "box")

    def _project(self, x: jax.Array) -> jax.Array:
        return projections.projection_box(x, self.lo, self.hi)

    def __repr__(self) -> str:
        return f"box(lo={self.lo!r}, hi={self.hi!r}{_format_on(self.on)})"


@dataclasses.dataclass(frozen=True, repr=False)
class Nonnegative(Constraint):
    """``x_i ≥ 0`` elementwise; see :func:`nonnegative`."""

    on: Selector = None

    def _project(self, x: jax.Array) -> jax.Array:
        return projections.projection_non_negative(x)

    def __repr__(self) -> str:
        return f"nonnegative({_format_on(self.on)[2:]})"


@dataclasses.dataclass(frozen=True, repr=False)
class Simplex(Constraint):
    """``x_i ≥ 0, Σ x_i = total`` per leaf; see :func:`simplex`."""

    total: float = 1.0
    on: Selector = None

    def __post_init__(self):
        object.__setattr__(self, "total", _positive_finite(self.total, "total", "simplex"))

    def _project(self, x: jax.Array) -> jax.Array:
        if x.size == 0:
            raise ValueError(f"simplex: an empty leaf cannot sum to total={self.total!r}")
        return _in_widest_float(_simplex, x, self.total)

    def __repr__(self) -> str:
        return f"simplex(total={self.total!r}{_format_on(self.on)})"


@dataclasses.dataclass(frozen=True, repr=False)
class L1Ball(Constraint):
    """``Σ |x_i| ≤ radius`` per leaf; see :func:`l1_ball`."""

    radius: float
    on: Selector = None

    def __post_init__(self):
        object.__setattr__(self, "radius", _positive_finite(self.radius, "radius", "l1_ball"))

    def _project(self, x: jax.Array) -> jax.Array:
        return x if x.size == 0 else _in_widest_float(_l1_ball, x, self.radius)

    def __repr__(self) -> str:
        return f"l1_ball(radius={self.radius!r}{_format_on(self.on)})"


@dataclasses.dataclass(frozen=True, repr=False)
class BoxL1(Constraint):
    """``lo ≤ x_i ≤ hi, Σ x_i ≤ radius`` (``0 ≤ lo``) per leaf; see :func:`box_l1`."""

    lo: float
    hi: float
    radius: float
    on: Selector = None

    def __post_init__(self):
        _set_interval(self, "box_l1")
        if self.lo < 0:
            raise ValueError(
                f"box_l1: lo must be ≥ 0 (so that Σ|x_i| = Σx_i on the box), got lo={self.lo!r}"
            )
        object.__setattr__(self, "radius", _positive_finite(self.radius, "radius", "box_l1"))

    def _project(self, x: jax.Array) -> jax.Array:
        n = x.size
        if n * self.lo > self.radius:
            raise ValueError(
                f"box_l1: the set is empty for a leaf of {n} entries: "
                f"n·lo = {n * self.lo!r} > radius = {self.radius!r}"
            )
        return x if n == 0 else _in_widest_float(_box_l1, x, self.lo, self.hi, self.radius)

    def __repr__(self) -> str:
        on = _format_on(self.on)
        return f"box_l1(lo={self.lo!r}, hi={self.hi!r}, radius={self.radius!r}{on})"


@dataclasses.dataclass(frozen=True, repr=False)
class Chain:
    """Several constraints applied in order; see :func:`chain`."""

    constraints: tuple[Callable[[PyTree], PyTree], ...]

    def __post_init__(self):
        constraints = tuple(self.constraints)
        for c in constraints:
            if not callable(c):
                raise TypeError(f"chain: every constraint must be callable lam -> lam, got {c!r}")
        object.__setattr__(self, "constraints", constraints)

    def __call__(self, lam: PyTree) -> PyTree:
        for c in self.constraints:
            lam = c(lam)
        return lam

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.constraints))})"


# --------------------------------------------------------------------------
# factories: the public spelling
# --------------------------------------------------------------------------


def box(lo: float, hi: float, *, on: Selector = None) -> Box:
    """Projection onto the box ``lo ≤ x_i ≤ hi``: ``clip(x, lo, hi)``.

    Args:
      lo: lower bound, a scalar (may be ``-inf``).
      hi: upper bound, a scalar ≥ ``lo`` (may be ``inf``).
      on: the part of λ governed: ``None`` (every leaf), a key of λ, or a
        function picking a part of λ.

    Returns:
      A frozen, callable ``Box``; ``ValueError`` if ``lo > hi``.
    """
    return Box(lo, hi, on=on)


def nonnegative(*, on: Selector = None) -> Nonnegative:
    """Projection onto the nonnegative orthant: ``max(x, 0)``.

    Args:
      on: the part of λ governed (see :func:`box`).
    """
    return Nonnegative(on=on)


def simplex(total: float = 1.0, *, on: Selector = None) -> Simplex:
    """Projection of each selected leaf onto ``{x ≥ 0, Σ x_i = total}``.

    ``max(x − θ, 0)`` with θ found by sorting, O(n log n) (Duchi et al. 2008;
    Condat 2016). Each leaf is projected separately, whatever its shape.

    Args:
      total: the sum, a finite number > 0.
      on: the part of λ governed (see :func:`box`).
    """
    return Simplex(total, on=on)


def l1_ball(radius: float, *, on: Selector = None) -> L1Ball:
    """Projection of each selected leaf onto ``{Σ |x_i| ≤ radius}``.

    Identity inside the ball; otherwise the simplex projection of ``|x|``
    with the signs restored. Each leaf is projected separately.

    Args:
      radius: a finite number > 0.
      on: the part of λ governed (see :func:`box`).
    """
    return L1Ball(radius, on=on)


def box_l1(lo: float, hi: float, radius: float, *, on: Selector = None) -> BoxL1:
    """Projection of each selected leaf onto ``{lo ≤ x_i ≤ hi, Σ x_i ≤ radius}``.

    The constraint on the per-example weights of data hyper-cleaning
    (Franceschi et al. 2017); with ``0 ≤ lo`` the sum is the l1 norm. The
    answer is ``clip(x − τ, lo, hi)`` with ``τ = 0`` when ``clip(x, lo, hi)``
    is feasible, else the ``τ > 0`` making the sum equal ``radius``, found by
    bisection and then solved exactly on the active set.

    Args:
      lo: lower bound, ``0 ≤ lo``.
      hi: upper bound, ``lo ≤ hi`` (may be ``inf``).
      radius: bound on the sum, a finite number > 0. A leaf of ``n`` entries
        needs ``n·lo ≤ radius`` (else the set is empty: ``ValueError`` at call
        time).
      on: the part of λ governed (see :func:`box`).
    """
    return BoxL1(lo, hi, radius, on=on)


def chain(*constraints: Callable[[PyTree], PyTree]) -> Chain:
    """The constraints applied in order, ``constraints[-1](... constraints[0](lam))``.

    The result is the composition of projections, which is the projection onto
    the intersection only in special cases (e.g. when the constraints govern
    disjoint parts of λ).
    """
    return Chain(constraints)
