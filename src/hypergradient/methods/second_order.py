"""The second-order part of each backward step of Reverse, forward-over-reverse (MixFlow-MG,
Kemaev et al. 2025): ``hg.Reverse(second_order="forward")``.

A backward step multiplies α_t by the Jacobian of the training step Φ_t, which holds the
derivatives of the gradient g = ∇_w L(w, λ, batch). Plain autodiff (``"reverse"``) transposes the
gradient's own backward pass: reverse-over-reverse, which keeps the loss's activations *and* the
cotangents of its backward pass. Here the gradient is a ``custom_vjp`` whose backward rule is one
Jacobian-vector product of the gradient instead: with ḡ the cotangent of g, and the Hessian
symmetric,

    ḡᵀ ∂g/∂w = (∇²_ww L ḡ)ᵀ            = ∂/∂ε ∇_w L(w + εḡ, λ)
    ḡᵀ ∂g/∂λ = ∂/∂λ ⟨ḡ, ∇_w L⟩           = ∂/∂ε ∇_λ L(w + εḡ, λ)
    ḡᵀ ∂g/∂m = ∂/∂ε ∇_m L(w + εḡ, λ, m)  (m: the model state's floating-point leaves)

all three the tangent of ``jvp(∇_(w,λ,m) L, w, ḡ)``: forward-over-reverse, which carries tangents
beside the activations rather than storing a second backward pass. The step keeps only its inputs
(w, λ, m, t) for the backward pass and recomputes the batch and the gradient there. The loss's
own cotangent and the model state's (BatchNorm's running statistics after the step) are first
order: one plain vjp of ``(w, λ, m) -> (L, m')``, needed only when the run carries a model state.
The data are not differentiated through it: the step's cotangent for the arrays ``Dynamics``
holds (the training examples) is zero, as no method here asks for it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from .._pytree import is_inexact, partition, signature
from ..precision import library_precision

#: The values of ``Reverse(second_order=...)``.
MODES = ("reverse", "forward", "auto")
#: ``"auto"`` keeps reverse-over-reverse when forward-over-reverse needs more than this many times
#: its floating-point operations (XLA's cost analysis), whatever the memory saved.
MUCH_SLOWER = 1.5


def _split(held):
    """A model state's floating-point leaves (differentiated) and how to put the state back."""
    leaves, treedef = jax.tree.flatten(held)
    mask = [is_inexact(x) for x in leaves]

    def rebuild(floats):
        it = iter(floats)
        return jax.tree.unflatten(treedef, [next(it) if m else x for x, m in zip(leaves, mask)])

    def cotangent(floats):
        """Cotangents of the whole state: ``floats`` for its floating leaves, float0 zeros for the rest."""
        it = iter(floats)
        return jax.tree.unflatten(
            treedef, [next(it) if m else np.zeros(np.shape(x), jax.dtypes.float0) for x, m in zip(leaves, mask)])

    return [x for x, m in zip(leaves, mask) if m], rebuild, cotangent


@jax.custom_vjp
def loss_and_grad(dyn, params, lam, t, held):
    """``dyn.loss_and_grad(params, λ, t, held)`` whose vjp is forward-over-reverse (see the module)."""
    return dyn.loss_and_grad(params, lam, t, held)


def _fwd(dyn, params, lam, t, held):
    return dyn.loss_and_grad(params, lam, t, held), (dyn, params, lam, t, held)


def _bwd(res, cts):
    dyn, params, lam, t, held = res
    loss_bar, g_bar, held_bar = cts
    batch, key = dyn.batch(t), dyn.step_key(t)
    floats, rebuild, cotangent = _split(held)

    def value(params, lam, floats):
        return dyn.train_loss(params, lam, batch, rebuild(floats), key)

    def grads(params):
        return jax.grad(lambda *args: value(*args)[0], (0, 1, 2))(params, lam, floats)

    first, second = jax.jvp(grads, (params,), (g_bar,))
    if held is None:  # the loss's cotangent alone: loss_bar · ∇L, whose ∇L the jvp computed
        first = jax.tree.map(lambda d: loss_bar.astype(d.dtype) * d, first)
    else:
        def outputs(*args):
            loss, new = value(*args)
            return loss, _split(new)[0]

        _, vjp = jax.vjp(outputs, params, lam, floats)
        first = vjp((loss_bar, _split(held_bar)[0]))
    w_bar, lam_bar, m_bar = jax.tree.map(jnp.add, first, second)
    return None, w_bar, lam_bar, None, (None if held is None else cotangent(m_bar))


loss_and_grad.defvjp(_fwd, _bwd)


def step_function(dyn, mode: str):
    """Φ_t as ``(s, λ, t) -> (s', loss)`` with its second-order products taken the ``mode`` way
    (``"reverse"`` or ``"forward"``)."""
    if mode == "forward":
        return lambda s, lam, t: dyn.step(s, lam, t, loss_and_grad=functools.partial(_named, dyn))
    return dyn.step


def _named(dyn, params, lam, t, held):
    return jax.tree.map(lambda x: checkpoint_name(x, GRADIENT), loss_and_grad(dyn, params, lam, t, held))


#: The name of the gradient's outputs in a forward-over-reverse step.
GRADIENT = "hypergradient.gradient"


def policy(mode: str):
    """What a step of Reverse's scan keeps for its backward pass: ``"reverse"`` its matrix
    products' outputs (among them the gradient's activations and its weight products);
    ``"forward"`` the gradient's outputs alone (one d more per step), so that the backward step
    recomputes the optimizer's update but neither the gradient nor any activation."""
    if mode == "forward":
        return jax.checkpoint_policies.save_only_these_names(GRADIENT)
    return jax.checkpoint_policies.dots_saveable


#: Options of programs compiled only to read their memory and operations (XLA assigns the
#: buffers before the backend's optimizations).
_MEMORY_ONLY = {"xla_backend_optimization_level": 0}
_choices: dict = {}


def _norm(model, lam, **state):
    """The objective ``"auto"`` measures with when it has none: ½‖w‖², whose gradient costs
    nothing next to the run's."""
    return 0.5 * sum(jnp.vdot(x, x) for x in jax.tree.leaves(model) if is_inexact(x))


def _shape(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) or hasattr(x, "aval") else x


def figures(method, dyn, objective, lam) -> tuple[int, float]:
    """XLA's temporary bytes and floating-point operations of ``method``'s program for this run
    (``objective(model, λ)``, the user's or ``_norm``), compiled from the shapes and
    never run."""
    arrays, skeleton = partition(objective)

    def program(d, a, l):
        with library_precision():
            return method.value_and_grad(d, lambda s, l: d.objective_at(skeleton.combine(a), s, l), l)

    exe = jax.jit(program).lower(*jax.tree.map(_shape, (dyn, arrays, lam))).compile(_MEMORY_ONLY)
    memory = exe.memory_analysis()
    cost = exe.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return (int(getattr(memory, "temp_size_in_bytes", -1)) if memory is not None else -1,
            float((cost or {}).get("flops", -1.0)))


def choose(method, dyn, objective, lam) -> str:
    """``"forward"`` when its program needs less temporary memory than ``"reverse"``'s and at most
    ``MUCH_SLOWER`` times its operations, else ``"reverse"`` (once per problem shapes)."""
    objective = _norm if objective is None else objective
    arrays, skeleton = partition(objective)
    key = (method, signature(dyn), signature(lam), skeleton, signature(arrays))
    if key not in _choices:
        rev, fwd = (figures(dataclasses.replace(method, second_order=m), dyn, objective, lam)
                    for m in ("reverse", "forward"))
        better = 0 <= fwd[0] < rev[0] and (rev[1] <= 0 or fwd[1] <= MUCH_SLOWER * rev[1])
        if len(_choices) >= 64:
            _choices.clear()
        _choices[key] = "forward" if better else "reverse"
    return _choices[key]
