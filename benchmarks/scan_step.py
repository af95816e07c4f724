"""A training step inside ``lax.scan`` against the same step called from a Python loop, on CPU,
and what the hypergradient program costs to compile against what it costs to run.

Three problems: a small CNN (``models.cnn_init``, ``models.cnn_apply``: 3x3 convolutions with
(16, 32) channels, SiLU, 2x2 average pooling, a dense layer; 28x28 images drawn at random, batch
128, momentum SGD), the same CNN with ``lax.conv_general_dilated`` for its convolutions
(``cnn-lax``, what ``cnn_apply`` was before it took one product over patches), and B1 (``b1.py``:
the MLP 784-50-50-50-10, batch 200). For each, in one process, alternating:

- ``loop``: the jitted step ``dyn.step`` called T times from Python (what a user's own loop does);
- ``scan``, ``scan_unroll2``, ``scan_unroll4``: the same step in one jitted ``lax.scan`` over T
  steps, unrolled 1, 2, 4 times;
- ``train``: ``hypergradient.dynamics.train`` (``Dynamics.rollout``: the library's training run).

Times are per training step (median over ``--repeats`` rounds, the order of the variants rotated
each round; ratios against ``loop`` are taken per round, then the median). Then, with
``--hypergradient``: the Reverse program and the checkpointed Reverse program
(``checkpoint_every`` ≈ √T): seconds to trace and lower to StableHLO, seconds XLA compiles, the
size of the HLO before and after optimization, and seconds to run; ``--policy`` repeats the
Reverse measurement with the step's remat policy of ``methods/reverse._scan`` replaced (an
ablation: ``dots_saveable``, the library's, against saving everything or nothing).

    python -m benchmarks.scan_step [--problems cnn-lax,cnn,b1] [--steps 20] [--repeats 5] [--hypergradient]
                                   [--policy] [--out benchmarks/results/scan_step.json]

XLA:CPU flags are read from ``XLA_FLAGS`` at the start of the process: run it again with, for
example, ``XLA_FLAGS=--xla_cpu_use_thunk_runtime=false`` to compare (the flags are recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import hypergradient as hg
from benchmarks import b1
from benchmarks.record import write_report
from hypergradient import dynamics
from hypergradient.apps import models
from hypergradient.methods import reverse
from hypergradient.precision import library_precision

CNN_CHANNELS = (16, 32)
CNN_BATCH, CNN_SIDE, CNN_EXAMPLES = 128, 28, 2048


def _cnn_loss(w, lam, batch):
    x, y = batch
    return models.cross_entropy(models.cnn_apply(w, x), y) + models.l2_penalty(w, jnp.exp(lam["log_l2"]))


def _per_layer(lam, t):
    return {"lr": list(lam["lr"]), "momentum": 0.9}


def _cnn_objective(x, y, w, lam):
    return models.cross_entropy(models.cnn_apply(w, x), y)


def cnn_lax_apply(params, x):
    """``models.cnn_apply`` (28x28 images) as it was, with ``lax.conv_general_dilated``: its
    gradient's convolutions run XLA:CPU's naive emitter inside a scan (see
    :func:`noncanonical_convolutions`); ``models.cnn_apply`` takes one product over patches."""
    x = x.reshape(x.shape[0], CNN_SIDE, CNN_SIDE, 1)
    for layer in params[:-1]:
        x = jax.lax.conv_general_dilated(x, layer["W"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.silu(x + layer["b"])
        n, h, w, c = x.shape
        x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    return x.reshape(x.shape[0], -1) @ params[-1]["W"] + params[-1]["b"]


def _cnn_lax_loss(w, lam, batch):
    x, y = batch
    return models.cross_entropy(cnn_lax_apply(w, x), y) + models.l2_penalty(w, jnp.exp(lam["log_l2"]))


def _cnn_lax_objective(x, y, w, lam):
    return models.cross_entropy(cnn_lax_apply(w, x), y)


def cnn_lax(steps: int):
    """:func:`cnn` with ``lax.conv_general_dilated`` for its convolutions (same values to 2e-7)."""
    dyn, objective, lam = cnn(steps)
    return dyn.replace(loss=_cnn_lax_loss), jax.tree_util.Partial(_cnn_lax_objective, *objective.args), lam


def cnn(steps: int):
    """The CNN's ``(dyn, objective, λ)``: random images (the time does not depend on the pixels)."""
    kx, ky, kw = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.uniform(kx, (CNN_EXAMPLES, CNN_SIDE * CNN_SIDE))
    y = jax.random.randint(ky, (CNN_EXAMPLES,), 0, 10)
    w0 = models.cnn_init(kw, (CNN_SIDE, CNN_SIDE), 10, channels=CNN_CHANNELS)
    layers = len(w0)
    dyn = hg.Dynamics(w0, _cnn_loss, hg.optim.momentum(dampen=True), _per_layer,
                      hg.Batches((x, y), CNN_BATCH), steps)
    lam = {"lr": jnp.full(layers, 0.1), "log_l2": jnp.full(layers, -8.0)}
    objective = jax.tree_util.Partial(_cnn_objective, x[:512], y[:512])
    return dyn, objective, lam


PROBLEMS = {"cnn-lax": cnn_lax, "cnn": cnn, "b1": lambda steps: b1.problem(steps=steps)}


def noncanonical_convolutions(compiled) -> int:
    """How many convolutions of a compiled program are not in the NHWC x HWIO -> NHWC form that
    XLA:CPU hands to Eigen. XLA's ConvCanonicalization transposes the others into that form only
    in the entry computation: in a while loop's body (``lax.scan``) the convolutions of a gradient
    keep the dimension numbers of JAX's transpose rules and run XLA's naive loop emitter."""
    return sum(1 for line in compiled.as_text().splitlines()
               if " convolution(" in line and "dim_labels=b01f_01io->b01f" not in line)


def _scan(unroll: int):
    def run(dyn, state, lam):
        with library_precision():
            return jax.lax.scan(lambda s, t: dyn.step(s, lam, t), state, jnp.arange(dyn.steps), unroll=unroll)
    return jax.jit(run)


def step_variants(dyn, lam) -> dict:
    """Each variant as a function ``() -> None`` that runs the T steps once and waits for them."""
    state = jax.block_until_ready(dyn.initial_state(lam))

    @jax.jit
    def step(dyn, state, lam, t):
        with library_precision():
            return dyn.step(state, lam, t)

    ts = [jnp.asarray(t, jnp.int32) for t in range(dyn.steps)]

    def loop():
        s = state
        for t in ts:
            s, loss = step(dyn, s, lam, t)
        jax.block_until_ready((s, loss))

    def scanned(program):
        return lambda: jax.block_until_ready(program(dyn, state, lam))

    variants = {"loop": loop, **{("scan" if u == 1 else f"scan_unroll{u}"): scanned(_scan(u)) for u in (1, 2, 4)},
                "train": lambda: jax.block_until_ready(dynamics.train(dyn, lam))}
    for run in variants.values():  # compile, and a first run that warms the caches
        run()
    return variants


def time_steps(dyn, lam, repeats: int) -> dict:
    """ms per step of each variant (median), and its time over ``loop``'s in the same round; how
    many convolutions of the step alone and of the scan are not in Eigen's form."""
    variants = step_variants(dyn, lam)
    state = dyn.initial_state(lam)
    forms = {"step": noncanonical_convolutions(
                 jax.jit(lambda d, s, l, t: d.step(s, l, t)).lower(dyn, state, lam, jnp.int32(0)).compile()),
             "scan": noncanonical_convolutions(_scan(1).lower(dyn, state, lam).compile())}
    names = list(variants)
    seconds = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            variants[n]()
            seconds[n].append(time.perf_counter() - start)
    times = {n: {"ms_per_step": 1e3 * statistics.median(s) / dyn.steps,
                 "vs_loop": statistics.median(a / b for a, b in zip(s, seconds["loop"]))}
             for n, s in seconds.items()}
    return {**times, "noncanonical_convolutions": forms}


@contextlib.contextmanager
def step_policy(policy):
    """``methods.reverse._scan`` with another remat policy for the step (``"none"``: no remat)."""
    original = reverse._scan

    def _scan(step_and_policy, state, lam, start, length, probes):
        fn = step_and_policy[0]
        if policy == "none":
            step = lambda s, t: fn(s, lam, t)  # noqa: E731
        else:
            step = jax.checkpoint(lambda s, t: fn(s, lam, t), policy=policy, prevent_cse=False)
        return jax.lax.scan(lambda s, tp: step(reverse._probe_weights(s, tp[1]), tp[0]), state,
                            (start + jnp.arange(length), probes))

    reverse._scan = _scan
    try:
        yield
    finally:
        reverse._scan = original


def hypergradient_costs(dyn, objective, lam, method, repeats: int) -> dict:
    """Seconds to lower, to compile and to run the hypergradient program, and its HLO's size."""
    from hypergradient._pytree import partition
    from hypergradient.hypergrad import temp_bytes, value_and_grad

    arrays, skeleton = partition(objective)
    program = jax.jit(lambda d, a, l: value_and_grad(d, skeleton.combine(a), l, method))
    start = time.perf_counter()
    lowered = program.lower(dyn, arrays, lam)
    lowered_at = time.perf_counter()
    exe = lowered.compile()
    compiled_at = time.perf_counter()
    runs = []
    for _ in range(max(1, repeats)):  # the executable is compiled: the first call is timed too
        t0 = time.perf_counter()
        jax.block_until_ready(exe(dyn, arrays, lam))
        runs.append(time.perf_counter() - t0)
    hlo = lowered.as_text()
    return {"lower_s": lowered_at - start, "compile_s": compiled_at - lowered_at, "run_s": statistics.median(runs),
            "stablehlo_lines": hlo.count("\n"), "optimized_hlo_lines": exe.as_text().count("\n"),
            "temp_mb": temp_bytes(exe) / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="cnn-lax,cnn,b1")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hypergradient", action="store_true", help="also the hypergradient's compile and run seconds")
    ap.add_argument("--policy", action="store_true", help="also Reverse with other remat policies of the step")
    ap.add_argument("--no-steps", action="store_true", help="skip the step timings")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    report = {"steps": args.steps, "repeats": args.repeats, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "cpus": len(os.sched_getaffinity(0)), "load_avg_1min_start": os.getloadavg()[0],
              "jax": jax.__version__, "problems": {}}
    for name in args.problems.split(","):
        dyn, objective, lam = PROBLEMS[name](args.steps)
        row = report["problems"][name] = {}
        if not args.no_steps:
            row["step"] = time_steps(dyn, lam, args.repeats)
            print(name, "step", row["step"], file=sys.stderr, flush=True)
        if args.hypergradient:
            k = max(2, math.isqrt(args.steps))
            methods = {"reverse": hg.Reverse(), f"checkpoint_every={k}": hg.Reverse(checkpoint_every=k)}
            for label, method in methods.items():
                row[label] = hypergradient_costs(dyn, objective, lam, method, args.repeats)
                print(name, label, row[label], file=sys.stderr, flush=True)
        if args.policy:
            policies = {"everything_saveable": jax.checkpoint_policies.everything_saveable,
                        "nothing_saveable": jax.checkpoint_policies.nothing_saveable, "no_remat": "none"}
            for label, policy in policies.items():
                with step_policy(policy):
                    row[f"reverse[{label}]"] = hypergradient_costs(dyn, objective, lam, hg.Reverse(), args.repeats)
                print(name, label, row[f"reverse[{label}]"], file=sys.stderr, flush=True)
    report["load_avg_1min_end"] = os.getloadavg()[0]
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
