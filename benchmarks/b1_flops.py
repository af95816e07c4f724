"""B1's arithmetic: the floating-point work of each hypergradient as a multiple of a training run.

XLA counts the flops of a compiled program (``cost_analysis``) but counts a
loop body once, so the run is costed per step: a training step Φ_t; Reverse's
forward-and-backward of one step (``jax.vjp`` of Φ_t, which is what the
backward loop does with the saved products plus the forward loop's step);
Reversible's step (a training step forward, then on the way back the step's
gradient again and its ``jax.vjp``, since re-creating v_{t-1} needs g_t);
Forward's step carrying m = 4 tangents (``jax.jvp`` vectorised over the 4
per-layer learning rates); and the validation objective with its gradient,
which every method pays once. The floor of a method is its flops over a
training run's, T·Φ:

    Reverse  ≥ (T·vjp(Φ) + ∇E) / (T·Φ),     Forward ≥ (T·jvp₄(Φ) + ∇E) / (T·Φ),
    Reversible ≥ (T·(Φ + vjp(∇L)) + ∇E) / (T·Φ)

These are what the timed ratios of ``benchmarks.b1_schedules`` can be compared with:
a measured ratio above the floor is overhead (dispatch, layout, memory), one
below it means the method's products ran faster per flop than training's.

    python -m benchmarks.b1_flops [--steps 100] [--out benchmarks/results/b1_flops.json]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import b1
from benchmarks.record import write_report


def flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax returned one dict per device
    return float(cost["flops"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)

    dyn, objective, lam = b1.problem(steps=a.steps)
    small, lr4 = b1.per_layer_lr(dyn, lam)
    state = dyn.initial_state(lam)
    t = jnp.int32(1)

    def step(s, lam):
        return dyn.step(s, lam, t)[0]

    def step4(s, lr):
        return small.step(s, lr, t)[0]

    def forward_step(s, lr, z):  # the primal step and its m tangents Z_t = A_t Z_{t-1} + B_t
        basis = jnp.eye(lr4["lr_layer"].size, dtype=lr4["lr_layer"].dtype)
        return jax.vmap(lambda zi, e: jax.jvp(step4, (s, lr), (zi, {"lr_layer": e}))[1])(z, basis)

    tangents = jax.tree.map(lambda x: jnp.stack([x] * lr4["lr_layer"].size), state)
    per_step = {
        "train_step": flops(step, state, lam),
        "reverse_step": flops(lambda s, l, ct: jax.vjp(step, s, l)[1](ct), state, lam, state),
        "reversible_backward_step": flops(
            lambda w, l, ct: jax.vjp(lambda w, l: dyn.loss_and_grad(w, l, t)[:2], w, l)[1](ct),
            state.params, lam, (jnp.zeros(()), state.params),
        ),
        "forward_step_m4": flops(forward_step, state, lr4, tangents),
        "objective_value_and_grad": flops(lambda w, l: jax.value_and_grad(objective)(w, l), state.params, lam),
    }
    train = a.steps * per_step["train_step"]
    report = {
        "benchmark": "B1 arithmetic (XLA cost analysis)",
        "steps": a.steps,
        "mflops": {k: v / 1e6 for k, v in per_step.items()},
        "floor_vs_train": {
            "reverse": (a.steps * per_step["reverse_step"] + per_step["objective_value_and_grad"]) / train,
            "forward-4lr": (a.steps * per_step["forward_step_m4"] + per_step["objective_value_and_grad"]) / train,
            "reversible": (a.steps * (per_step["train_step"] + per_step["reversible_backward_step"])
                           + per_step["objective_value_and_grad"]) / train,
            "objective_alone": per_step["objective_value_and_grad"] / train,
        },
    }
    write_report(report, a.out)


if __name__ == "__main__":
    main()
