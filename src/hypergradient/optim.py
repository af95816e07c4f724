"""Differentiable inner optimizers.

An inner optimizer is a pure pair ``init(params) -> state`` and
``update(grads, state, params, hparams) -> (params, state)``, the shape of
optax's ``GradientTransformation`` with one change: the hyperparameters
arrive at every step, as traced values, so that a hypergradient can reach
them. Each hyperparameter may be

- a scalar (one value for all weights),
- values keyed by the weights' paths (one value per layer, or per any subtree):
  a pytree whose leaves sit at paths that are prefixes of the weights' paths,
  such as ``[lr0, lr1]`` for a list of two layers, ``{"conv": a, "head": b}``
  for a dict or a Flax NNX module, ``{"layers.0": a, "layers.1": b}`` for an
  Equinox MLP, or the weights' full structure (one value per weight),
- :func:`per_layer` values assigned by labels, as ``optax.multi_transform``
  assigns transformations: a label tree or a function of the weights.

``Optimizer.update`` checks the names it is given and broadcasts every value
to the weights' full structure (:func:`broadcast_to`) before the rule sees it.
:func:`warmup_cosine` is a schedule whose peak and warmup length may be
hyperparameters.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._pytree import is_array
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
      names_in_state: where the hyperparameter names are known only from the
        optimizer state (``from_optax`` with a transformation: its members
        wrapped in ``optax.inject_hyperparams``), ``state -> names``; they are
        then checked at every step, when the state is there.
    """

    name: str
    init: Callable[[Params], State]
    rule: Callable[[Params, State, Params, Mapping[str, Any]], tuple[Params, State]]
    required: tuple[str, ...]
    defaults: tuple[tuple[str, float], ...] = ()
    broadcast: bool = True
    reversal: str | None = None
    names_in_state: Callable[[State], tuple[str, ...]] | None = None

    @property
    def hparam_names(self) -> tuple[str, ...]:
        return self.required + tuple(k for k, _ in self.defaults)

    def check_hparams(self, hparams: Mapping[str, Any], state: State | None = None) -> None:
        """Raise ``ValueError`` naming any missing or unknown hyperparameter.

        An optimizer whose names are in its state (``names_in_state``) checks the names
        only when ``state`` is given.
        """
        if not isinstance(hparams, Mapping):
            raise TypeError(
                f"optimizer_hparams must return a dict of hyperparameters for "
                f"{self.name} ({', '.join(self.hparam_names)}), got {type(hparams).__name__}"
            )
        if self.names_in_state is not None:
            if state is not None:
                self._check_names_in_state(hparams, self.names_in_state(state))
            return
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

    def _check_names_in_state(self, hparams: Mapping[str, Any], names: tuple[str, ...]) -> None:
        unknown = [k for k in hparams if k not in names]
        if unknown:
            hint = (
                "; it takes none: only the members of an optax transformation wrapped in "
                "optax.inject_hyperparams have hyperparameters optimizer_hparams can set, e.g. "
                "optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)("
                "learning_rate=1e-3, weight_decay=1e-4))"
                if not names
                else f"; it takes {sorted(names)}"
            )
            raise ValueError(f"optimizer {self.name!r} has no hyperparameter(s) {unknown}{hint}")

    def update(self, grads: Params, state: State, params: Params, hparams: Mapping[str, Any]):
        """One step: returns ``(new_params, new_state)``."""
        self.check_hparams(hparams, state)
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
    """One value per weight: ``value`` given for the weights ``params``, in their structure.

    ``value`` is one of

    - a scalar or an array (the same value for every weight; an array must broadcast
      against each weight's shape),
    - a pytree keyed by paths: each weight takes the leaf of ``value`` whose path is the
      longest prefix of its own path. Paths are written with dots: dict keys, sequence
      indices and attribute names (``"layers.0.weight"`` in an Equinox MLP,
      ``"conv.kernel.value"`` in a Flax NNX module, ``"1.W"`` in a list of dicts). So
      ``[a, b]`` gives a list of two layers one value each, ``{"conv": a, "head": b}``
      every weight under ``conv`` and ``head``, ``{"layers.0": a, "layers.1": b}`` the
      two first layers of an Equinox MLP (a dict's keys may hold dots), and a tree with
      the weights' own structure one value per weight,
    - :func:`per_layer` values, assigned by labels.

    Every weight must get a value and every value must reach a weight; the ``ValueError``
    otherwise names the weight's path (or the unused key). Use it in a loss as well, to
    give a per-layer value to the weights of any model.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [_dotted(path) for path, _ in flat]
    if isinstance(value, PerLayer):
        per_leaf = value.assign(params, paths, name)
    elif jax.tree_util.treedef_is_leaf(jax.tree.structure(value)):
        per_leaf = [value] * len(flat)
    else:
        per_leaf = _by_prefix(_keyed(value), paths, name, "value")
    for v, path, (_, w) in zip(per_leaf, paths, flat):
        shape = jnp.shape(v)
        if shape and not _broadcasts(shape, jnp.shape(w)):
            raise ValueError(
                f"optimizer hyperparameter {name!r} has an array of shape {shape} for the weight "
                f"{_show(path)} of shape {jnp.shape(w)}; give a scalar, an array of the weight's own shape, one "
                "value per layer as a list (e.g. list(lam[...][t])) or a dict keyed by the weights' paths, or "
                "hg.optim.per_layer(values, labels)"
            )
    return jax.tree.unflatten(treedef, per_leaf)


def _components(path) -> tuple[str, ...]:
    """A JAX key path as the strings users write: dict keys, sequence indices, attribute names."""
    out = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _show(path: tuple[str, ...]) -> str:
    return repr(".".join(path)) if path else "(the weights themselves)"


def _dotted(path) -> tuple[str, ...]:
    """The components of a key path, a key with dots split at them (``{"layers.0": a}``)."""
    return tuple(part for c in _components(path) for part in c.split("."))


def _keyed(tree: Any) -> dict[tuple[str, ...], Any]:
    """``{path: leaf}`` for the leaves of ``tree``."""
    return {_dotted(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _by_prefix(table: dict[tuple[str, ...], Any], paths: list[tuple[str, ...]], name: str, what: str) -> list:
    """For each weight path, the entry of ``table`` at its longest prefix; every entry used."""
    out, used = [], set()
    for path in paths:
        for n in range(len(path), -1, -1):
            if path[:n] in table:
                out.append(table[path[:n]])
                used.add(path[:n])
                break
        else:
            keys = sorted(".".join(k) for k in table)
            raise ValueError(
                f"optimizer hyperparameter {name!r}: the weight {_show(path)} gets no {what}; none of the "
                f"{what} paths {keys} is a prefix of its path (weights: {_listing(paths)})"
            )
    unused = sorted(".".join(k) for k in table if k not in used)
    if unused:
        raise ValueError(
            f"optimizer hyperparameter {name!r}: the {what} path(s) {unused} reach no weight "
            f"(weights: {_listing(paths)})"
        )
    return out


def _listing(paths, most: int = 8) -> str:
    shown = [".".join(p) for p in paths[:most]]
    return ", ".join(shown) + (f", ... ({len(paths)} in all)" if len(paths) > most else "")


@jax.tree_util.register_pytree_node_class
class PerLayer:
    """Hyperparameter values assigned to the weights by labels (see :func:`per_layer`).

    A pytree whose leaves are the values, so it may be returned by ``optimizer_hparams``
    with traced values; the labels are static.
    """

    def __init__(self, values: Any, labels: Any = None):
        if not (labels is None or callable(labels)):
            labels = tuple((path, label) for path, label in _keyed(labels).items())
        self.values, self.labels = values, labels

    def tree_flatten(self):
        return (self.values,), self.labels

    @classmethod
    def tree_unflatten(cls, labels, children):
        obj = object.__new__(cls)
        obj.values, obj.labels = children[0], labels
        return obj

    def __repr__(self) -> str:
        return f"PerLayer(values={self.values!r}, labels={self.labels!r})"

    def assign(self, params: Params, paths: list[tuple[str, ...]], name: str) -> list:
        """The value of each weight (in the order of ``paths``, the weights' leaves)."""
        values = self.values
        if self.labels is None:  # the values' own paths; an array: one value per top-level entry
            if jax.tree_util.treedef_is_leaf(jax.tree.structure(values)) and jnp.ndim(values) >= 1:
                values = [values[i] for i in range(jnp.shape(values)[0])]
            return _by_prefix(_keyed(values), paths, name, "value")
        labels = self.labels(params) if callable(self.labels) else self.labels
        table = _keyed(labels) if callable(self.labels) else dict(labels)
        per_leaf = _by_prefix(table, paths, name, "label")
        if isinstance(values, Mapping):
            keys = list(values)
            lookup = values.__getitem__
        else:
            keys = list(range(len(values)))
            lookup = lambda i: values[i]  # noqa: E731
        out, kind = [], "keys" if isinstance(values, Mapping) else "indices"
        for path, label in zip(paths, per_leaf):
            if label not in keys:
                raise ValueError(
                    f"optimizer hyperparameter {name!r}: the weight {_show(path)} has the label {label!r}, "
                    f"which has no value (the values have {kind} {keys})"
                )
            out.append(lookup(label))
        unused = [k for k in keys if k not in per_leaf]
        if unused:
            raise ValueError(
                f"optimizer hyperparameter {name!r}: no weight has the label(s) {unused} (the weights' labels are "
                f"{sorted(set(map(str, per_leaf)))})"
            )
        return out


def per_layer(values: Any, labels: Any = None) -> PerLayer:
    """Hyperparameter values for parts of the weights, assigned by labels.

    Return it from ``optimizer_hparams`` for any optimizer hyperparameter (or give it to
    :func:`broadcast_to` with the weights, e.g. in a loss).

    Args:
      values: a dict ``{label: value}``, or a sequence or an array with one value per
        label ``0, 1, ...`` (values traced from λ, e.g. ``lam["lr"][t]``). A value is a
        scalar or an array that broadcasts against each weight it reaches.
      labels: as ``optax.multi_transform``'s: a pytree of labels with the weights'
        structure, or a prefix of it, or a function ``weights -> that pytree``. Its
        leaves' paths are matched as :func:`broadcast_to` matches paths, so a dict
        ``{"body": "base", "head.linear": "head"}`` labels subtrees of any model.
        ``None``: ``values`` is itself keyed by paths (an array or a sequence: its i-th
        value for the weights' i-th top-level entry, ``list(values)``).

    Returns:
      A :class:`PerLayer` (a pytree of the values; the labels are static).

    Every weight must get a value and every value must reach a weight; the ``ValueError``
    otherwise names the weight's path. Example, an Equinox MLP whose last layer has a
    learning rate of its own::

        labels = lambda m: jax.tree_util.tree_map_with_path(
            lambda path, _: "head" if path[1].idx == len(m.layers) - 1 else "body", m)
        optimizer_hparams = lambda lam, t: {
            "lr": hg.optim.per_layer({"body": lam["lr"], "head": lam["lr_head"]}, labels)}
    """
    if not (labels is None or callable(labels)):
        try:
            hash(tuple(jax.tree.leaves(labels)))
        except TypeError as e:
            raise TypeError(f"per_layer: labels must be hashable (strings, integers), got {labels!r}") from e
    if labels is not None and not isinstance(values, (Mapping, list, tuple)) and jnp.ndim(values) == 0:
        raise TypeError(
            "per_layer: with labels, values is a dict {label: value} or a sequence / array indexed by "
            f"integer labels, got {type(values).__name__}"
        )
    return PerLayer(values, labels)


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


def warmup_cosine(t, peak, warmup, decay_steps, end=0.0, init=0.0) -> jax.Array:
    """A linear warmup then a cosine decay, differentiable in all its arguments.

    The value at step ``t`` (counted from 0, as ``optimizer_hparams`` sees it)::

        t < warmup:                  init + (peak − init) · t / warmup
        warmup <= t:                 end + (peak − end) · (1 + cos(π p)) / 2,
                                     p = min((t − warmup) / (decay_steps − warmup), 1)

    the values of ``optax.warmup_cosine_decay_schedule(init, peak, warmup, decay_steps, end)``
    where that takes integers. Here ``warmup`` is a real number, so its hypergradient is
    defined (the value moves smoothly with it at every step but ``t == warmup``), and any
    argument may come from λ. optax's own schedules test their arguments in Python and so
    refuse traced ones. Use it in ``optimizer_hparams``::

        optimizer_hparams=lambda lam, t: {
            "learning_rate": hg.optim.warmup_cosine(t, jnp.exp(lam["log_peak"]), lam["warmup"], T)}

    Args:
      t: the step (an integer, usually traced).
      peak: the value at the end of the warmup.
      warmup: the warmup's length in steps, a real number ``>= 0`` (0: no warmup).
      decay_steps: the step at which the value reaches ``end``, warmup included; after it
        the value stays at ``end``.
      end: the final value.
      init: the value at step 0.

    Returns:
      The value at step ``t``, in the dtype of the arguments (at least a float).
    """
    dtype = jnp.result_type(peak, warmup, decay_steps, end, init, 1.0)
    t, peak, warmup, decay_steps, end, init = (
        jnp.asarray(x).astype(dtype) for x in (t, peak, warmup, decay_steps, end, init)
    )
    # the branch not taken must have a finite derivative too (0 · ∞ is NaN): safe denominators
    rising = init + (peak - init) * t / jnp.where(warmup > 0, warmup, 1)
    span = decay_steps - warmup
    progress = jnp.where(span > 0, jnp.clip((t - warmup) / jnp.where(span > 0, span, 1), 0, 1), 1)
    falling = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(t < warmup, rising, falling)


_INJECTED = tuple(
    getattr(optax, n) for n in ("InjectStatefulHyperparamsState", "InjectHyperparamsState") if hasattr(optax, n)
)


def _is_injected(x) -> bool:
    return isinstance(x, _INJECTED)


def _injected(state: State) -> dict[str, tuple[Any, str, Any]]:
    """The hyperparameters of the members of an optax state wrapped in ``inject_hyperparams``:
    ``{name: (path to the member's state, the member's own name for it, the member's state)}``.

    A name only one member has is used as it is; a name several members share is qualified by
    each member's path, its dict keys and sequence indices (``"1.learning_rate"`` in a chain,
    ``"adamw.learning_rate"`` in an ``optax.named_chain``, ``"head.learning_rate"`` for the
    group ``head`` of an ``optax.multi_transform``).
    """
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_injected)[0]
    members = [(path, s) for path, s in flat if _is_injected(s)]
    counts: dict[str, int] = {}
    for _, s in members:
        for k in s.hyperparams:
            counts[k] = counts.get(k, 0) + 1
    # dict keys and sequence indices; attribute names (inner_state, ...) are optax's plumbing,
    # kept only where two members would otherwise have the same place
    short = [".".join(_components(p for p in path if not hasattr(p, "name"))) for path, _ in members]
    full = [".".join(_components(path)) for path, _ in members]
    names = {}
    for (path, s), where, long in zip(members, short, full):
        where = long if short.count(where) > 1 else where
        for k in s.hyperparams:
            names[k if counts[k] == 1 else f"{where}.{k}"] = (path, k, s)
    return names


def _set_injected(state: State, hparams: Mapping[str, Any]) -> State:
    """``state`` with the injected hyperparameters set to ``hparams`` (in each one's own dtype, so
    that the scan carry keeps its types). A schedule (a callable, the default given to
    ``from_optax``) stays where it is; setting a scheduled one to a value is an error."""
    table = _injected(state)
    given: dict[Any, dict[str, Any]] = {}
    overridden = []
    for name, value in hparams.items():
        path, key, member = table[name]
        if key in getattr(member, "hyperparams_states", {}):
            if not callable(value):
                overridden.append(name)
            continue
        if callable(value) or not jax.tree_util.treedef_is_leaf(jax.tree.structure(value)):  # PerLayer too
            raise TypeError(
                f"from_optax: hyperparameter {name!r} must be a number (optax applies one value to every weight), "
                f"got {type(value).__name__}; for values per group of weights, use optax.multi_transform with "
                "one optimizer wrapped in optax.inject_hyperparams per group"
            )
        given.setdefault(path, {})[key] = jnp.asarray(value, jnp.result_type(member.hyperparams[key]))
    if overridden:
        raise ValueError(
            f"from_optax: {sorted(overridden)} {'is a schedule' if len(overridden) == 1 else 'are schedules'} of "
            "step t given to optax; optimizer_hparams cannot set it too (give a number as the default instead, "
            "and a schedule of t in optimizer_hparams, e.g. hg.optim.warmup_cosine)"
        )

    def put(path, s):
        if _is_injected(s) and path in given:
            return s._replace(hyperparams={**s.hyperparams, **given[path]})
        return s

    return jax.tree_util.tree_map_with_path(put, state, is_leaf=_is_injected)


def _optax_optimizer(name: str, tx: optax.GradientTransformation, **fields) -> Optimizer:
    """An optax transformation as an :class:`Optimizer` whose hyperparameters are set, at every step,
    in the states of its members wrapped in ``inject_hyperparams``."""
    update = zero_safe_roots(tx.update)

    def init(params):
        return tx.init(params), jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), bool), params)

    def rule(g, carried, w, h):
        state, seen = carried
        state = _set_injected(state, h)
        seen = jax.tree.map(lambda s, g: s | (g != 0), seen, g)
        g = jax.tree.map(lambda s, g: jnp.where(s, g, jax.lax.stop_gradient(g)), seen, g)
        updates, state = update(g, state, w)
        return optax.apply_updates(w, updates), (state, seen)

    return Optimizer(name, init, rule, broadcast=False, **fields)


def from_optax(
    transformation: Callable[..., optax.GradientTransformation] | optax.GradientTransformation, **hparams: Any
) -> Optimizer:
    """Any optax optimizer, made differentiable in its numeric hyperparameters.

    Two forms:

    - ``from_optax(factory, name=default, ...)``: ``factory`` is an optax optimizer factory
      (``optax.adam``, ``optax.sgd``, ...). The keyword arguments name the hyperparameters that
      become differentiable and give their default values; ``optimizer_hparams`` may then return
      any of them at every step (scalars: optax applies one value to all weights). A default may
      also be an optax schedule (a function of the step count, e.g.
      ``optax.exponential_decay(0.1, 10, 0.5)``): it is evaluated at every step t and is not a
      hyperparameter ``optimizer_hparams`` may set.
    - ``from_optax(transformation)``: any ``optax.GradientTransformation``, such as
      ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))``, used as it is. The
      hyperparameters ``optimizer_hparams`` may set are those of its members wrapped in
      ``optax.inject_hyperparams`` (every numeric argument of such a member, under the member's
      own names, with the values given there as defaults). A name that two members share is
      qualified by the member's place: its index in an ``optax.chain`` (``"1.learning_rate"``),
      its name in an ``optax.named_chain`` or its group in an ``optax.multi_transform``
      (``"adamw.learning_rate"``). A member without ``inject_hyperparams`` is fixed.

    Built on ``optax.inject_hyperparams``, which keeps the hyperparameters in the optimizer
    state where gradients reach them. For a schedule whose parameters are hyperparameters
    (a warmup-cosine's peak and warmup length), give its value at t in ``optimizer_hparams``
    (:func:`warmup_cosine`).

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

        adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-4)
        opt = hg.optim.from_optax(optax.chain(optax.clip_by_global_norm(1.0), adamw))
        # optimizer_hparams=lambda lam, t: {"learning_rate": ..., "weight_decay": ...}

    Raises:
      TypeError: ``transformation`` is neither an optax factory nor a transformation, or a
        transformation comes with keyword arguments.
    """
    if isinstance(transformation, optax.GradientTransformation):
        if hparams:
            raise TypeError(
                f"from_optax: a transformation ({_optax_name(transformation)}) takes no keyword arguments "
                f"(got {sorted(hparams)}); wrap the member whose hyperparameters are tuned in "
                "optax.inject_hyperparams with its defaults there, e.g. "
                "optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-4), "
                "or give a factory: from_optax(optax.adamw, learning_rate=1e-3)"
            )
        return _optax_optimizer(
            _optax_name(transformation), transformation, required=(),
            names_in_state=lambda carried: tuple(_injected(carried[0])),
        )
    if not callable(transformation) or isinstance(transformation, type):
        raise TypeError(
            "from_optax takes an optax optimizer factory (from_optax(optax.adam, learning_rate=1e-3)) or an "
            f"optax.GradientTransformation (from_optax(optax.chain(...))), got {type(transformation).__name__} "
            f"{transformation!r:.80}"
        )
    if not hparams:
        raise ValueError(
            "from_optax needs the hyperparameters to expose, with defaults, e.g. "
            "from_optax(optax.sgd, learning_rate=0.1)"
        )
    tx = optax.inject_hyperparams(transformation)(**hparams)
    name = f"optax.{getattr(transformation, '__name__', 'optimizer')}"
    # booleans and other non-numbers are fixed arguments of the factory, as inject_hyperparams takes them
    exposed = tuple((k, v) for k, v in hparams.items() if callable(v) or (is_array(v) or isinstance(v, (int, float)))
                    and not isinstance(v, bool))
    return _optax_optimizer(name, tx, required=(), defaults=exposed)


def _optax_name(tx: optax.GradientTransformation) -> str:
    """``optax.chain`` for a chain: the factory whose closure ``tx.init`` is."""
    qualname = getattr(tx.init, "__qualname__", "")
    return f"optax.{qualname.split('.<locals>')[0]}" if ".<locals>" in qualname else "optax transformation"


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
