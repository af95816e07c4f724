"""B3: memory-light hypergradients (Reversible, DrMAD) on B1 and its long form.

For every T in ``--steps`` (default 100, 1000, 3000) on the B1 problem
(Fashion-MNIST, MLP 784-50-50-50-10, batch 200, dampened momentum 0.9,
float32): seconds and XLA temporary memory of a plain training run,
``Reverse()``, ``Reverse(checkpoint_every=50)``, ``Reversible()`` (its
buffer sized by the library: 0.25 bits per weight per step at μ = 0.9) and
``DrMAD()``; Reversible's measured bits per weight per step, the bytes its
buffer holds against the T·d states a stored trajectory holds, and whether it
re-created w_0, v_0 bit for bit; the cosine similarity of DrMAD's
hypergradient with the exact one per hyperparameter group (the exact one is
Reverse's, or Reversible's where Reverse would not fit in ``--max-temp-gb``:
its memory is then read from the compiled program without running it).
Then Reversible's bits per weight per step at μ = 0.5, 0.9, 0.98 against
log2(1/μ) (T = 100).

Prints one JSON object.

    python -m benchmarks.b3_memory [--steps 100,1000,3000] [--repeats 1] [--dtype float64]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import hypergradient as hg
from benchmarks import b1
from benchmarks.b1_schedules import median_seconds
from benchmarks.record import write_report
from hypergradient import dynamics
from hypergradient.apps.methods import make
from hypergradient.hypergrad import compiled

METHODS = ("reverse", "checkpoint", "reversible", "drmad")


def cosine(a, b) -> float:
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def temp_bytes(exe) -> int:
    m = exe.memory_analysis()
    return int(getattr(m, "temp_size_in_bytes", -1)) if m is not None else -1


def run_steps(T, data, a):
    dyn, objective, lam = b1.problem(steps=T, dtype=a.dtype, data=data)
    train_exe = dynamics.train.lower(dyn, lam).compile()
    out = {
        "steps": T,
        "dtype": str(lam["lr"].dtype),
        "train": {"seconds": median_seconds(lambda: dyn.run(lam), a.repeats), "temp_mb": temp_bytes(train_exe) / 2**20},
        "methods": {},
    }
    grads = {}
    for name in METHODS:
        method = make(name, checkpoint_every=50).resolve(dyn, lam)  # Reversible: its buffer sized
        _, compile_s, sizes = compiled(dyn, objective, method, lam)
        row = {"method": repr(method), "temp_mb": sizes["temp_bytes"] / 2**20, "compile_seconds": compile_s}
        if row["temp_mb"] > a.max_temp_gb * 1024:
            row["skipped"] = f"temp memory above --max-temp-gb {a.max_temp_gb}: not run"
            out["methods"][name] = row
            print(f"T={T} {name}: {row['temp_mb']:.0f} MB, skipped", file=sys.stderr)
            continue
        try:
            res = hg.hypergrad(dyn, objective, lam, method)
        except hg.DivergenceError as e:
            row["diverged"] = str(e)
            out["methods"][name] = row
            print(f"T={T} {name}: diverged ({e})", file=sys.stderr)
            continue
        if name == "reversible":
            s = res.stats
            row.update(
                bits_per_weight_per_step=s["bits_per_weight_per_step"],
                buffer_bytes_allocated=s["buffer_bytes"],
                buffer_bytes_used=s["buffer_bytes_used"],
                trajectory_bytes_equivalent=s["trajectory_bytes_equivalent"],
                stored_state_ratio=s["trajectory_bytes_equivalent"] / s["buffer_bytes_used"],
                exact_reversal=s["exact_reversal"],
            )
        row["seconds"] = median_seconds(lambda: hg.hypergrad(dyn, objective, lam, method).grad, a.repeats)
        row["ratio_to_train"] = row["seconds"] / out["train"]["seconds"]
        row["value"] = float(res.value)
        grads[name] = res.grad
        out["methods"][name] = row
        print(f"T={T} {name}: {row['seconds']:.2f}s, temp {row['temp_mb']:.1f} MB", file=sys.stderr)
    for name in out["methods"]:
        if "seconds" in out["methods"][name] and "seconds" in out["methods"].get("reverse", {}):
            out["methods"][name]["ratio_to_reverse"] = out["methods"][name]["seconds"] / out["methods"]["reverse"]["seconds"]
    exact_name = "reverse" if "reverse" in grads else "reversible"
    if exact_name in grads:
        out["exact_reference"] = exact_name
        for name in ("drmad", "reversible", "checkpoint"):
            if name in grads and name != exact_name:
                out["methods"][name]["cosine_to_exact"] = {k: cosine(grads[name][k], grads[exact_name][k]) for k in grads[name]}
                out["methods"][name]["norm_ratio_to_exact"] = {
                    k: float(np.linalg.norm(np.asarray(grads[name][k])) / np.linalg.norm(np.asarray(grads[exact_name][k])))
                    for k in grads[name]
                }
    return out


def bits_vs_mu(data, dtype):
    dyn, objective, lam = b1.problem(steps=100, dtype=dtype, data=data)
    rows = []
    for mu in (0.5, 0.9, 0.98):
        lam_mu = {**lam, "momentum": jnp.full_like(lam["momentum"], mu)}
        res = hg.hypergrad(dyn, objective, lam_mu, hg.Reversible(max_bits_per_step=1.5))
        rows.append({
            "momentum": mu,
            "bits_per_weight_per_step": res.stats["bits_per_weight_per_step"],
            "log2_one_over_mu": math.log2(1 / mu),
            "stored_state_ratio": res.stats["trajectory_bytes_equivalent"] / res.stats["buffer_bytes_used"],
            "exact_reversal": res.stats["exact_reversal"],
        })
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="100,1000,3000")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max-temp-gb", type=float, default=6.0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--out")
    a = p.parse_args(argv)
    jax.config.update("jax_enable_x64", a.dtype == "float64")
    data = b1.load_data()
    start = time.perf_counter()
    report = {
        "benchmark": "B3",
        "dataset": data.name,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "runs": [run_steps(int(T), data, a) for T in a.steps.split(",")],
        "bits_vs_momentum": bits_vs_mu(data, a.dtype),
    }
    report["wall_seconds"] = time.perf_counter() - start
    write_report(report, a.out)


if __name__ == "__main__":
    main()
