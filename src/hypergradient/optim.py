"""Differentiable inner optimizers.

An inner optimizer is a pure pair ``init(params) -> state`` and
``update(grads, state, params, hparams) -> (params, state)``, the shape of
optax's ``GradientTransformation`` with one change: the hyperparameters
arrive at every step, as traced values, so that a hypergradient can reach
them. Each hyperparameter may be

- a scalar (one value for all weights),
- a pytree that is a prefix of the weights' structure (one value per layer),
- the weights' full structure (one value per weight).

``Optimizer.update`` checks the names it is given and broadcasts every value
to the weights' full structure before the rule sees it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._roots import zero_safe_roots

Params = Any
State = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Optimizer:
    """A differentiable inner optimizer.

    Attributes:
      name: what the optimizer is (``"sgd"``, ``"momentum"``, ...).
      init: ``params -> state``.
      rule: ``(grads, state, params, hparams) -> (params, state)`` with every
        hyperparameter already broadcast to the weights' structure.
      required: names of the hyperparameters that must be given.
      defaults: names and values of the optional ones.
      broadcast: whether hyperparameters are broadcast to the weights'
        structure before ``rule`` sees them (``from_optax`` passes them on as
        they are).
      reversal: which exact fixed-point inverse the rule admits, if any:
        ``"sgd"`` (w ← w − η g), ``"heavy_ball"`` (v ← μv + g) or
        ``"dampened"`` (v ← μv + (1−μ)g), each followed by w ← w − ηv.
        ``hg.Reversible`` serves exactly the optimizers that declare one.
    """

    name: str
    init: Callable[[Params], State]
    rule: Callable[[Params, State, Params, Mapping[str, Any]], tuple[Params, State]]
    required: tuple[str, ...]
    defaults: tuple[tuple[str, float], ...] = ()
    broadcast: bool = True
    reversal: str | None = None

    @property
    def hparam_names(self) -> tuple[str, ...]:
        return self.required + tuple(k for k, _ in self.defaults)

    def check_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming any missing or unknown hyperparameter."""
        if not isinstance(hparams, Mapping):
            raise TypeError(
                f"optimizer_hparams must return a dict of hyperparameters for "
                f"{self.name} ({', '.join(self.hparam_names)}), got {type(hparams).__name__}"
            )
        missing = [k for k in self.required if k not in hparams]
        if missing:
            raise ValueError(
                f"optimizer {self.name!r} needs hyperparameter(s) {missing} that "
                f"optimizer_hparams does not give (it gave {sorted(hparams)})"
            )
        unknown = [k for k in hparams if k not in self.hparam_names]
        if unknown:
            raise ValueError(
                f"optimizer {self.name!r} has no hyperparameter(s) {unknown}; "
                f"it takes {list(self.hparam_names)}"
            )

    def update(self, grads: Params, state: State, params: Params, hparams: Mapping[str, Any]):
        """One step: returns ``(new_params, new_state)``."""
        self.check_hparams(hparams)
        full = {**dict(self.defaults), **hparams}
        if self.broadcast:
            full = {k: broadcast_to(v, params, k) for k, v in full.items()}
        new_params, new_state = self.rule(grads, state, params, full)
        # Hyperparameters in a wider dtype than the weights (float64 λ, float32 w)
        # must not promote the state: a training loop's carry keeps its types.
        return _cast_like(new_params, params), _cast_like(new_state, state)


def _cast_like(new, old):
    return jax.tree.map(lambda n, o: jnp.asarray(n, jnp.result_type(o)), new, old)


def broadcast_to(value: Any, params: Params, name: str = "hyperparameter") -> Params:
    """Broadcast a scalar, a prefix pytree or a full pytree to ``params``' structure."""
    try:
        full = jax.tree.map(lambda v, sub: jax.tree.map(lambda _: v, sub), value, params)
    except ValueError as e:
        raise ValueError(
            f"optimizer hyperparameter {name!r} must be a scalar, a pytree prefix of the "
            f"weights (one value per layer) or the weights' full structure; its structure "
            f"{jax.tree.structure(value)} does not fit the weights' {jax.tree.structure(params)}"
        ) from e
    for v, w in zip(jax.tree.leaves(full), jax.tree.leaves(params)):
        shape = jnp.shape(v)
        if shape and not _broadcasts(shape, jnp.shape(w)):
            raise ValueError(
                f"optimizer hyperparameter {name!r} has an array of shape {shape} where a weight has shape "
                f"{jnp.shape(w)}; give a scalar, one value per layer as a list (e.g. list(lam[...][t])), "
                "or an array of the weight's own shape"
            )
    return full


def _broadcasts(a: tuple, b: tuple) -> bool:
    try:
        return jnp.broadcast_shapes(a, b) == tuple(b)
    except ValueError:
        return False


def _zeros_like(params: Params) -> Params:
    return jax.tree.map(jnp.zeros_like, params)


def normalized(m, u, u_hat, eps, eps_root):
    """m / (sqrt(û + eps_root) + eps), and 0 where u = 0 (the weight has seen no gradient yet).

    There m = 0 too, so the value is unchanged; what changes is the derivative. At u = 0 the
    step's derivative in m is 1/(sqrt(eps_root) + eps), about 10^8: the backward pass multiplies
    by it at every step and overflows (float32: from about T = 5 with optax's eps_root = 0, T = 50
    with 1e-16), although the weight, and so its hypergradient, stays exactly where it is whatever
    λ. Differentiating the step as 0 there gives that exact hypergradient. ``u`` is tested where
    ``u_hat`` is used, and the square root is taken of a safe stand-in, so that the branch not
    taken has a finite derivative (0 · ∞ would be NaN).
    """
    seen = u > 0
    safe = jnp.where(seen, u_hat, 1.0)
    return jnp.where(seen, m / (jnp.sqrt(safe + eps_root) + eps), 0.0)


def sgd() -> Optimizer:
    """Plain gradient descent: w ← w − η g. Hyperparameters: ``lr``."""

    def rule(g, state, w, h):
        return jax.tree.map(lambda w, g, lr: w - lr * g, w, g, h["lr"]), state

    return Optimizer("sgd", lambda params: (), rule, ("lr",), reversal="sgd")


def momentum(dampen: bool = False) -> Optimizer:
    """SGD with momentum. Hyperparameters: ``lr`` (η), ``momentum`` (μ).

    Heavy ball:       v ← μ v + g,         w ← w − η v.
    ``dampen=True``:  v ← μ v + (1 − μ) g, w ← w − η v
    (Maclaurin et al. 2015, whose velocity is our −v).
    """

    def rule(g, v, w, h):
        mu = h["momentum"]
        if dampen:
            v = jax.tree.map(lambda v, g, mu: mu * v + (1 - mu) * g, v, g, mu)
        else:
            v = jax.tree.map(lambda v, g, mu: mu * v + g, v, g, mu)
        w = jax.tree.map(lambda w, v, lr: w - lr * v, w, v, h["lr"])
        return w, v

    return Optimizer("momentum_dampened" if dampen else "momentum", _zeros_like, rule, ("lr", "momentum"),
                     reversal="dampened" if dampen else "heavy_ball")


def nesterov() -> Optimizer:
    """Nesterov momentum: v ← μ v + g, w ← w − η (g + μ v). Hyperparameters: ``lr``, ``momentum``."""

    def rule(g, v, w, h):
        v = jax.tree.map(lambda v, g, mu: mu * v + g, v, g, h["momentum"])
        w = jax.tree.map(lambda w, g, v, mu, lr: w - lr * (g + mu * v), w, g, v, h["momentum"], h["lr"])
        return w, v

    return Optimizer("nesterov", _zeros_like, rule, ("lr", "momentum"))


class AdamState(NamedTuple):
    count: jax.Array
    mu: Params
    nu: Params


def adam() -> Optimizer:
    """Adam. Hyperparameters: ``lr``; optional ``b1`` (0.9), ``b2`` (0.999), ``eps`` (1e-8).

    m ← b1 m + (1−b1) g,  u ← b2 u + (1−b2) g²,
    w ← w − η m̂ / (sqrt(û + eps_root) + eps),  m̂ = m/(1−b1ᵗ), û = u/(1−b2ᵗ).
    The tiny ``eps_root`` (1e-16) keeps the derivative of the square root finite.
    A weight that has seen no gradient at all (u = 0: a feature that is zero in
    every example, a dead unit) takes the step 0, differentiated as 0 (see
    :func:`normalized`).
    """

    def init(params):
        return AdamState(jnp.zeros((), jnp.int32), _zeros_like(params), _zeros_like(params))

    def rule(g, s, w, h):
        t = s.count + 1
        mu = jax.tree.map(lambda m, g, b1: b1 * m + (1 - b1) * g, s.mu, g, h["b1"])
        nu = jax.tree.map(lambda u, g, b2: b2 * u + (1 - b2) * g * g, s.nu, g, h["b2"])

        def step(w, m, u, lr, b1, b2, eps, eps_root):
            return w - lr * normalized(m / (1 - b1**t), u, u / (1 - b2**t), eps, eps_root)

        w = jax.tree.map(step, w, mu, nu, h["lr"], h["b1"], h["b2"], h["eps"], h["eps_root"])
        return w, AdamState(t, mu, nu)

    return Optimizer(
        "adam", init, rule, ("lr",), (("b1", 0.9), ("b2", 0.999), ("eps", 1e-8), ("eps_root", 1e-16))
    )


def rmsprop() -> Optimizer:
    """RMSprop. Hyperparameters: ``lr``; optional ``decay`` (0.9), ``eps`` (1e-8).

    u ← ρ u + (1−ρ) g²,  w ← w − η g / (sqrt(u + eps_root) + eps), with the
    step of a weight that has seen no gradient (u = 0) 0, as in :func:`adam`.
    """

    def rule(g, u, w, h):
        u = jax.tree.map(lambda u, g, rho: rho * u + (1 - rho) * g * g, u, g, h["decay"])
        w = jax.tree.map(
            lambda w, g, u, lr, eps, er: w - lr * normalized(g, u, u, eps, er),
            w, g, u, h["lr"], h["eps"], h["eps_root"],
        )
        return w, u

    return Optimizer("rmsprop", _zeros_like, rule, ("lr",), (("decay", 0.9), ("eps", 1e-8), ("eps_root", 1e-16)))


def from_optax(factory: Callable[..., optax.GradientTransformation], **hparams: float) -> Optimizer:
    """Any optax optimizer, made differentiable in its numeric hyperparameters.

    ``factory`` is an optax optimizer factory (``optax.adam``, ``optax.sgd``,
    ...). The keyword arguments name the hyperparameters that become
    differentiable and give their default values; ``optimizer_hparams`` may
    then return any of them at every step (scalars: optax applies one value
    to all weights). A default may also be an optax schedule (a function of
    the step count, e.g. ``optax.exponential_decay(0.1, 10, 0.5)``): it is
    evaluated at every step t and is not a hyperparameter ``optimizer_hparams``
    may set. Built on ``optax.inject_hyperparams``, which keeps the
    hyperparameters in the optimizer state where gradients reach them.

    Adaptive rules divide by sqrt(v), and v = 0 for a weight that has seen only zero
    gradients (a feature absent from training, a dead unit). There sqrt's derivative is
    infinite and the step's derivative in the gradient is 1/ε ≈ 10⁸, so the hypergradient
    is NaN (0 · ∞) or overflows on the backward pass, although nothing about that weight
    depends on λ. So square roots are differentiated as 0 at 0, and until a weight's first
    nonzero gradient its gradient reaches optax as a constant. Values are unchanged; the
    derivative dropped is that of a gradient that is exactly zero, which is zero for
    such structural zeros.

    Example::

        opt = hg.optim.from_optax(optax.adam, learning_rate=1e-3, b1=0.9)
        # optimizer_hparams=lambda lam, t: {"learning_rate": jnp.exp(lam["log_lr"])}
    """
    if not hparams:
        raise ValueError(
            "from_optax needs the hyperparameters to expose, with defaults, e.g. "
            "from_optax(optax.sgd, learning_rate=0.1)"
        )
    inner = optax.inject_hyperparams(factory)(**hparams)
    update = zero_safe_roots(inner.update)
    schedules = {k for k, v in hparams.items() if callable(v)}

    def init(params):
        return inner.init(params), jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), bool), params)

    def rule(g, carried, w, h):
        state, seen = carried
        overridden = sorted(k for k in schedules if not callable(h[k]))
        if overridden:
            raise ValueError(
                f"from_optax: {overridden} {'is a schedule' if len(overridden) == 1 else 'are schedules'} of step t "
                "given to from_optax; optimizer_hparams cannot set it too (give a number as the default instead)"
            )
        # Keep the dtypes of the state's own copies so the scan carry is stable.
        given = {k: jnp.asarray(v, jnp.result_type(state.hyperparams[k])) for k, v in h.items() if k not in schedules}
        state = state._replace(hyperparams={**state.hyperparams, **given})
        seen = jax.tree.map(lambda s, g: s | (g != 0), seen, g)
        g = jax.tree.map(lambda s, g: jnp.where(s, g, jax.lax.stop_gradient(g)), seen, g)
        updates, state = update(g, state, w)
        return optax.apply_updates(w, updates), (state, seen)

    name = f"optax.{getattr(factory, '__name__', 'optimizer')}"
    return Optimizer(name, init, rule, (), tuple(hparams.items()), broadcast=False)


def loss_scaled(optimizer: Optimizer, scale: float) -> Optimizer:
    """``optimizer`` for a training loss multiplied by ``scale``: static loss scaling, for float16.

    A float16 backward pass flushes gradients below 6e-8 to zero (bfloat16, with float32's
    exponent range, needs no scaling). The loss returns ``scale · L`` (the product taken in
    float32, after the float16 part), so that every cotangent inside the float16 computation is
    ``scale`` times larger; this optimizer divides the gradient by ``scale`` again, in the
    weights' dtype, before ``optimizer``'s rule sees it. Both are ordinary arithmetic, so the
    hypergradient differentiates through them like any step (a dynamic scale that changes when
    a gradient overflows would not be differentiable). The per-step losses a run reports are the
    scaled ones. A power of two keeps the division exact:

        def loss(w, lam, batch):
            w16, x16 = hg.precision.to_compute((w, batch[0]), jnp.float16)
            return 1024.0 * cross_entropy(apply(w16, x16).astype(jnp.float32), batch[1])

        dyn = hg.Dynamics(w0, loss, hg.optim.loss_scaled(hg.optim.adam(), 1024.0), ...)
    """
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number (a power of two, 2.0**10), got {scale!r}")

    def rule(g, state, w, h):
        return optimizer.rule(jax.tree.map(lambda g: g / scale, g), state, w, h)

    return dataclasses.replace(optimizer, name=f"{optimizer.name}(loss_scale={scale:g})", rule=rule, reversal=None)
