"""Forward-over-reverse against reverse-over-reverse backward steps: ``hg.Reverse(second_order=)``.

On B1 (MLP 784-50-50-50-10, batch 200), a wide MLP (784-W-W-10, batch 200) and the CNN of
``apps/models.py`` (3x3 convolutions of ``--channels``, SiLU, pooling, batch 200), all on B1's
data and run (dampened momentum, per-step per-layer learning rates and momenta, per-layer L2), and
the byte-level transformer of ``apps/transformer.py`` (2 layers, d_model 64, 4 heads, context 64,
AdamW with a warmup-cosine schedule, batches of 16 windows of four standard-library packages'
source, ``apps/lm.py``, 256 validation windows taken 16 at a time by ``hg.chunked``, so that the
objective's gradient does not outweigh the run's; the report records the Python version, whose library the text is), for
``Reverse()`` and ``Reverse(checkpoint_every=k)``: XLA's temporary memory of the compiled program
(``memory_analysis().temp_size_in_bytes``) and the median seconds of a run, both second-order
modes side by side, timed alternately so that load from other processes falls on both alike; the
ratios forward / reverse; for plain Reverse what each step adds to the memory (from programs of T/2
and T steps: the ratio a long run tends to); the largest relative difference of the two hypergradients; and what
``second_order="auto"`` chooses. Prints a table, then one JSON object.

    python -m benchmarks.second_order [--steps 50] [--width 1024] [--channels 32,64] [--repeats 3]
        [--only Transformer]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import hypergradient as hg
from benchmarks import b1
from benchmarks.record import write_report
from hypergradient._pytree import partition
from hypergradient.apps import lm, models, text
from hypergradient.hypergrad import compiled
from hypergradient.methods import second_order
from hypergradient.planning import short_bytes


def _cnn_loss(w, lam, batch):
    x, y = batch
    return models.cross_entropy(models.cnn_apply(w, x), y) + models.l2_penalty(w, jnp.exp(lam["log_l2"]))


def _cnn_objective(x, y, w, lam):
    return models.cross_entropy(models.cnn_apply(w, x), y)


def problems(steps: int, width: int, channels: tuple[int, ...], data):
    """``{name: (dyn, objective, λ)}``: B1, the wide MLP and the CNN on B1's data and run."""
    out = {"B1": b1.problem(steps=steps, data=data)}
    wide = b1.arrays(steps=steps, data=data)
    sizes = (wide.x_train.shape[1], width, width, data.n_classes)
    w0 = models.mlp_init(jax.random.PRNGKey(0), sizes)
    out[f"MLP 784-{width}-{width}-10"] = b1.build(dataclasses.replace(
        wide, weights=[(np.asarray(p["W"]), np.asarray(p["b"])) for p in w0],
        log_l2=wide.log_l2[: len(w0)], lr=wide.lr[:, : len(w0)], momentum=wide.momentum[:, : len(w0)]))
    dyn, _, lam = b1.problem(steps=steps, data=data)
    side = int(np.sqrt(data.train.x.shape[1]))
    w0 = models.cnn_init(jax.random.PRNGKey(0), (side, side), data.n_classes, channels)
    layers = len(w0)
    lam = {"log_l2": lam["log_l2"][:layers], "lr": 0.2 * lam["lr"][:, :layers], "momentum": lam["momentum"][:, :layers]}
    val = jax.tree_util.Partial(_cnn_objective, jnp.asarray(data.val.x[:1000]), jnp.asarray(data.val.y[:1000]))
    out[f"CNN {','.join(map(str, channels))}"] = (dyn.replace(init=w0, loss=_cnn_loss), val, lam)
    sources = text.stdlib_sources()
    train, val = text.windows(sources, 65)
    out["Transformer d64 L2"] = lm.problem(train, (val[0][:256], val[1][:256]), len(sources), steps, batch_size=16,
                                             val_chunk=16)
    return out


def _relative_difference(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def measure(dyn, objective, lam, method, repeats: int) -> dict:
    """Both modes of ``method`` on one problem: bytes, seconds (alternating), their ratios."""
    modes = {m: dataclasses.replace(method, second_order=m) for m in ("reverse", "forward")}
    exes, row = {}, {"method": repr(method)}
    for mode, m in modes.items():
        exe, compile_seconds, sizes = compiled(dyn, objective, m, lam)
        exes[mode] = exe
        row[mode] = {"temp_mb": sizes["temp_bytes"] / 2**20, "compile_seconds": compile_seconds, "seconds": []}
    args = (dyn, partition(objective)[0], lam)
    sols = {mode: jax.block_until_ready(exe(*args)) for mode, exe in exes.items()}  # warm-up
    for _ in range(repeats):
        for mode, exe in exes.items():
            start = time.perf_counter()
            jax.block_until_ready(exe(*args))
            row[mode]["seconds"].append(time.perf_counter() - start)
    for mode in modes:
        row[mode]["seconds"] = statistics.median(row[mode]["seconds"])
    row["memory_ratio"] = row["forward"]["temp_mb"] / row["reverse"]["temp_mb"]
    row["time_ratio"] = row["forward"]["seconds"] / row["reverse"]["seconds"]
    row["grad_rel_difference"] = _relative_difference(sols["forward"].grad, sols["reverse"].grad)
    if not method.levels:  # what each step adds: fitted at T/2 and T steps (memory only, never run)
        half = max(1, dyn.steps // 2)
        grow = {mode: short_bytes(dyn, objective, m, lam, dyn.steps) - short_bytes(dyn, objective, m, lam, half)
                for mode, m in modes.items()}
        row["per_step_mb"] = {mode: b / max(1, dyn.steps - half) / 2**20 for mode, b in grow.items()}
    row["auto"] = second_order.choose(dataclasses.replace(method, second_order="auto"), dyn, objective, lam)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--channels", default="32,64")
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated problem names' prefixes (B1, MLP, CNN, Transformer)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    data = b1.load_data()
    channels = tuple(int(c) for c in a.channels.split(","))
    rows = []
    for name, (dyn, objective, lam) in problems(a.steps, a.width, channels, data).items():
        if a.only and not any(name.startswith(p) for p in a.only.split(",")):
            continue
        for method in (hg.Reverse(), hg.Reverse(checkpoint_every=a.checkpoint_every)):
            row = {"problem": name, **measure(dyn, objective, lam, method, a.repeats)}
            rows.append(row)
            print(f"{name:24s} {row['method']:50s} temp {row['reverse']['temp_mb']:8.1f} -> "
                  f"{row['forward']['temp_mb']:8.1f} MiB ({row['memory_ratio']:.2f}x)  time "
                  f"{row['reverse']['seconds']:.3g} -> {row['forward']['seconds']:.3g} s "
                  f"({row['time_ratio']:.2f}x)  auto: {row['auto']}  grad rel diff {row['grad_rel_difference']:.1e}"
                  + ("  per step {reverse:.2f} -> {forward:.2f} MiB".format(**row["per_step_mb"])
                     if "per_step_mb" in row else ""), flush=True)
    write_report({"steps": a.steps, "data": data.name, "backend": jax.default_backend(),
                  "python": text.python_version(), "rows": rows}, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
