"""What data and weight sharding cost: collectives per step and memory per device.

For D = 1, 2, 4, 8 devices (forced host devices on a CPU, one process per D; on a machine with D
accelerators, the real ones), B1's examples are spread over a ``"data"`` mesh axis and the
training run and each method's hypergradient are compiled, not run. From each compiled program:

- the collectives (all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all) in
  every loop body (a loop of T iterations: per training step on the way forward or back; of T/k:
  per checkpointed segment), in bytes and as a multiple of the gradient's size (the weights' bytes);
- XLA's memory analysis per device (temporary + argument bytes), against D = 1.

With ``--weights``, a wide MLP's hidden units are split over a ``"model"`` axis instead (its
weights sharded with ``NamedSharding``, the examples whole on every device): the temporary memory
per device of Reverse, checkpointed Reverse, Forward and Reversible against D = 1, and the number of all-reduce,
all-gather and reduce-scatter operations in each loop's iteration. ``--weights --model transformer``
shards the byte-level transformer of ``apps/lm.py`` (batches of 16 windows) the same way, as
Megatron-LM does: the query/key/value and first MLP kernels by columns (heads, hidden units), the
attention output and second MLP kernels by rows, the embeddings by feature and the output layer by
token; Reverse and checkpointed Reverse only.

    python -m benchmarks.comms [--devices 1,2,4,8] [--steps 100] [--out benchmarks/results/comms.json]
    python -m benchmarks.comms --weights --steps 20 --out benchmarks/results/comms_weights.json
    python -m benchmarks.comms --weights --model transformer --devices 1,4 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "pred": 1, "s8": 1, "u8": 1}


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO result type such as ``(f32[784,50]{1,0}, f32[50])``."""
    total = 0
    for dtype, dims in re.findall(r"\b(f64|f32|bf16|f16|s32|u32|s64|u64|pred|s8|u8)\[([\d,]*)\]", text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES[dtype]
    return total


def loop_collectives(hlo: str) -> list[dict]:
    """One entry per while loop: its trip count and the collective bytes of one iteration
    (counting the computations its body calls)."""
    computations, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(", line)  # computations start unindented
        if head and line.rstrip().endswith("{"):
            name = head.group(1)
            computations[name] = []
        elif name is not None:
            computations[name].append(line)

    def own(comp):
        out = {"bytes": 0, **dict.fromkeys(COLLECTIVES, 0)}
        for line in computations.get(comp, []):
            m = re.match(r"\s*%?[\w.\-]+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
            if m:
                out["bytes"] += shape_bytes(m.group(1))
                out[m.group(2)] += 1
        return out

    def called(comp):
        names = set()
        for line in computations.get(comp, []):
            names.update(re.findall(r"(?:to_apply|calls|body|condition|branch_computations)=\{?%?([\w.\-]+)", line))
        return names

    def total(comp, seen=()):
        out = own(comp)
        for c in called(comp):
            if c not in seen and c != comp:
                for k, v in total(c, seen + (comp,)).items():
                    out[k] += v
        return out

    loops = []
    for comp, lines in computations.items():
        for line in lines:
            m = re.search(r"\bwhile\(.*body=%?([\w.\-]+)", line)
            if m:
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                per = total(m.group(1))
                loops.append({"trip_count": int(trips.group(1)) if trips else None,
                              "bytes_per_iteration": per.pop("bytes"), "ops_per_iteration": per})
    return loops


def measure(steps: int) -> dict:
    """This process's devices, all on the data axis: B1's compiled programs."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from benchmarks import b1
    from hypergradient import dynamics
    from hypergradient._pytree import nbytes
    from hypergradient.apps.methods import make
    from hypergradient.hypergrad import compiled

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    dyn, objective, lam = b1.build(b1.arrays(steps=steps), mesh=mesh)
    gradient_bytes = nbytes(dyn.init)
    out = {"devices": len(devices), "platform": devices[0].platform, "gradient_bytes": gradient_bytes, "programs": {}}

    def record(name, exe):
        mem = exe.memory_analysis()
        loops = loop_collectives(exe.as_text())
        out["programs"][name] = {
            "loops": loops,
            "memory_per_device": int(mem.temp_size_in_bytes + mem.argument_size_in_bytes),
        }

    record("train", dynamics.train.lower(dyn, lam).compile())
    for name in ("reverse", "checkpoint", "forward", "truncated", "reversible", "drmad"):
        method = make(name, truncation=10, checkpoint_every=10)
        exe, _, _ = compiled(dyn, objective, method, lam)
        record(name, exe)
    return out


WIDTH, DEPTH, IN, OUT, BATCH = 1024, 2, 64, 10, 128  # the weight-sharded MLP


def mlp_problem(mesh, steps: int):
    """An MLP IN-WIDTH-…-WIDTH-OUT (tanh), every hidden dimension split over ``mesh``'s "model" axis
    (a (None, model) spec on a matrix whose outputs are hidden units, (model, None) on the last),
    trained with momentum on a fixed batch; λ: a per-step learning rate and a log L2 weight."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    import hypergradient as hg

    rng = np.random.default_rng(0)
    sizes = (IN, *[WIDTH] * DEPTH, OUT)
    w, specs = [], []
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w.append({"w": (rng.normal(size=(m, n)) / np.sqrt(m)).astype(np.float32), "b": np.zeros(n, np.float32)})
        last = i == len(sizes) - 2
        specs.append({"w": PartitionSpec("model", None) if last else PartitionSpec(None, "model"),
                      "b": PartitionSpec() if last else PartitionSpec("model")})
    w0 = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), w, specs)
    x, xv = rng.normal(size=(BATCH, IN)).astype(np.float32), rng.normal(size=(BATCH, IN)).astype(np.float32)
    y, yv = rng.integers(0, OUT, BATCH), rng.integers(0, OUT, BATCH)

    def forward(w, x):
        for layer in w[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        return x @ w[-1]["w"] + w[-1]["b"]

    def xent(w, x, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(forward(w, x)), y[:, None], 1))

    def loss(w, lam, batch):
        return xent(w, *batch) + jnp.exp(lam["log_l2"]) * sum(jnp.sum(l["w"] ** 2) for l in w)

    dyn = hg.Dynamics(init=w0, loss=loss, optimizer=hg.optim.momentum(),
                      optimizer_hparams=lambda lam, t: {"lr": lam["lr"][t], "momentum": 0.9},
                      data=(jnp.asarray(x), jnp.asarray(y)), steps=steps)
    objective = jax.tree_util.Partial(lambda xv, yv, w, lam: xent(w, xv, yv), jnp.asarray(xv), jnp.asarray(yv))
    lam = {"log_l2": jnp.asarray(-8.0, jnp.float32), "lr": jnp.full(steps, 0.05, jnp.float32)}
    return dyn, objective, lam


def transformer_problem(mesh, steps: int):
    """The transformer LM of ``apps/lm.py`` with its weights sharded over ``mesh``'s ``"model"`` axis."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from hypergradient.apps import lm, text

    sources = text.stdlib_sources()
    train, val = text.windows(sources, 65)
    dyn, objective, lam = lm.problem(train, (val[0][:256], val[1][:256]), len(sources), steps, batch_size=16)
    cols, rows, whole = PartitionSpec(None, "model"), PartitionSpec("model", None), PartitionSpec()
    by_column = {"W": cols, "b": PartitionSpec("model")}
    block = {"norm1": {"scale": whole, "bias": whole}, "qkv": by_column, "proj": {"W": rows, "b": whole},
             "norm2": {"scale": whole, "bias": whole}, "fc": by_column, "out": {"W": rows, "b": whole}}
    specs = {"embed": cols, "pos": cols, "blocks": [block] * len(dyn.init["blocks"]),
             "norm": {"scale": whole, "bias": whole}, "head": by_column}
    w0 = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), dyn.init, specs)
    return dyn.replace(init=w0), objective, lam


def measure_weights(steps: int, model: str = "mlp") -> dict:
    """This process's devices, all on the model axis: the sharded model's compiled programs."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    import hypergradient as hg
    from hypergradient import dynamics
    from hypergradient._pytree import nbytes
    from hypergradient.hypergrad import compiled

    devices = jax.devices()
    build = transformer_problem if model == "transformer" else mlp_problem
    dyn, objective, lam = build(Mesh(np.array(devices), ("model",)), steps)
    out = {"devices": len(devices), "platform": devices[0].platform, "weight_bytes": nbytes(dyn.init), "programs": {}}

    def record(name, exe):
        mem = exe.memory_analysis()
        out["programs"][name] = {"loops": loop_collectives(exe.as_text()),
                                 "temp_per_device": int(mem.temp_size_in_bytes),
                                 "arguments_per_device": int(mem.argument_size_in_bytes)}

    record("train", dynamics.train.lower(dyn, lam).compile())
    methods = (("reverse", hg.Reverse()), ("checkpoint", hg.Reverse(checkpoint_every=10)),
               ("forward", hg.Forward()), ("reversible", hg.Reversible()))
    for name, method in methods[:2] if model == "transformer" else methods:
        exe, _, _ = compiled(dyn, objective, method, lam)
        record(name, exe)
    return out


def weights_table(results: list[dict]) -> str:
    """Temporary and argument memory per device against D = 1, and the collectives of each loop's
    iteration (all-reduce / all-gather / reduce-scatter, others) times its trip count."""
    base = results[0]["programs"]
    lines = ["| program | D | temp per device (MB) | × D = 1 | arguments per device (× D = 1) "
             "| collectives per loop iteration: AR / AG / RS / other × iterations |",
             "|---|---:|---:|---:|---:|---|"]
    for r in results:
        for name, prog in r["programs"].items():
            loops = ", ".join(
                f"{o['all-reduce']} / {o['all-gather']} / {o['reduce-scatter']} / "
                f"{o['collective-permute'] + o['all-to-all']} "
                f"({l['bytes_per_iteration'] / 1e3:.0f} kB) × {l['trip_count']}"
                for l in prog["loops"] for o in [l["ops_per_iteration"]]) or "no loop"
            lines.append(f"| {name} | {r['devices']} | {prog['temp_per_device'] / 1e6:.2f} "
                         f"| {prog['temp_per_device'] / base[name]['temp_per_device']:.2f} "
                         f"| {prog['arguments_per_device'] / base[name]['arguments_per_device']:.2f} | {loops} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="1,2,4,8", help="device counts to force on a CPU")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--weights", action="store_true",
                   help="shard a wide MLP's weights over a model axis instead of B1's examples over a data axis")
    p.add_argument("--model", choices=("mlp", "transformer"), default="mlp", help="with --weights: what to shard")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one D, in a child process
    a = p.parse_args(argv)
    if a.measure:
        print(json.dumps(measure_weights(a.steps, a.model) if a.weights else measure(a.steps)))
        return 0
    results = []
    for d in map(int, a.devices.split(",")):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={d}"}
        if env.get("JAX_PLATFORMS", "cpu") != "cpu":
            env.pop("XLA_FLAGS")
        run = subprocess.run([sys.executable, "-m", "benchmarks.comms", "--measure", "--steps", str(a.steps),
                              *(["--weights", "--model", a.model] if a.weights else [])],
                             env=env, capture_output=True, text=True, check=False, cwd=ROOT)
        if run.returncode:
            print(run.stderr[-2000:], file=sys.stderr)
            return run.returncode
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    if a.weights:
        return report(weights_table(results), a, results)
    base = {k: v["memory_per_device"] for k, v in results[0]["programs"].items()}
    lines = ["| program | D | collectives per loop iteration (× gradient) × iterations | memory per device (× D = 1) |",
             "|---|---:|---|---:|"]
    for r in results:
        for name, prog in r["programs"].items():
            per_step = ", ".join(f"{l['bytes_per_iteration'] / 1e3:.0f} kB ({l['bytes_per_iteration'] / r['gradient_bytes']:.2f}x)"
                                 f" × {l['trip_count']}" for l in prog["loops"]) or "no loop"
            lines.append(f"| {name} | {r['devices']} | {per_step} | {prog['memory_per_device'] / base[name]:.2f} |")
    return report("\n".join(lines), a, results)


def report(table: str, a, results: list[dict]) -> int:
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"steps": a.steps, "weights": a.weights, "model": a.model, "results": results, "table": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
