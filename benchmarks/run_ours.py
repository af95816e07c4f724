"""Time one of our hypergradient methods on B1 in its own process; one JSON line.

The counterpart of ``benchmarks/peers/run_peer.py``, with the same
interface and the same measuring protocol (``common.measure``): a warm-up
training run (which compiles it), the hypergradient program compiled ahead
of time, a cold hypergradient call whose peak resident memory less the
memory just before is ``peak_rss_delta_mb``, then ``--repeats`` alternating
timed rounds of training and hypergradient. A process per method makes the
peak its own.

The problem comes from an .npz written by ``common.save_problem`` (the
runner writes it from ``b1_problem``'s initial weights and λ, and every
implementation reads the same file); the dynamics and objective are
``b1_problem``'s, with the file's initial weights, data and λ.

    python benchmarks/run_ours.py reverse --problem b1.npz --json --save-grads ours.npz
    python benchmarks/run_ours.py forward-m --m 64 --problem b1.npz --no-train --json

Methods: reverse, checkpoint (``--checkpoint-every``), truncated
(``--truncate``), forward-4lr (the 4 per-layer learning rates, m = 4),
reversible and drmad (when the library has them), and for the sweep over
the number of hyperparameters m, reverse-m and forward-m: λ is the first m
entries of the flattened (T, 4) learning-rate schedule, the rest fixed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks.peers import common  # noqa: E402

METHOD_NAMES = ("reverse", "checkpoint", "truncated", "forward-4lr", "reversible", "drmad",
                "reverse-m", "forward-m")

# Methods a colleague is adding: taken from ``hg`` when exported there, else
# from their module (so the runner serves them before the export lands).
_OPTIONAL = {"Reversible": "hypergradient.methods.reversible", "DrMAD": "hypergradient.methods.drmad"}


def method_class(name: str):
    """``hg.<name>``, or the class from its module; None when neither exists."""
    import hypergradient as hg

    if hasattr(hg, name):
        return getattr(hg, name)
    try:
        return getattr(importlib.import_module(_OPTIONAL[name]), name)
    except (ImportError, AttributeError, KeyError):
        return None


def available_methods() -> list[str]:
    """The B1 methods this checkout can run (reversible/drmad only when present)."""
    names = ["reverse", "checkpoint", "truncated", "forward-4lr"]
    names += [n for n, cls in (("reversible", "Reversible"), ("drmad", "DrMAD")) if method_class(cls)]
    return names


def make_method(name: str, args):
    import hypergradient as hg

    if name in ("reverse", "reverse-m"):
        return hg.Reverse()
    if name == "checkpoint":
        return hg.Reverse(checkpoint_every=args.checkpoint_every)
    if name == "truncated":
        return hg.Truncated(args.truncate)
    if name in ("forward-4lr", "forward-m"):
        return hg.Forward()
    cls = method_class({"reversible": "Reversible", "drmad": "DrMAD"}[name])
    if cls is None:
        raise SystemExit(f"{name}: this checkout of hypergradient has no such method")
    return cls()


def from_problem(problem: common.B1Problem):
    """B1 as ``b1_problem`` builds it, but with the problem's data, initial weights and λ."""
    import jax.numpy as jnp

    import hypergradient as hg
    from b1_schedules import b1_problem

    split = types.SimpleNamespace
    data = split(
        train=split(x=problem.x_train, y=problem.y_train.astype(np.int32)),
        val=split(x=problem.x_val, y=problem.y_val.astype(np.int32)),
        n_classes=common.LAYER_SIZES[-1],
    )
    dyn, objective, _ = b1_problem(steps=problem.T, batch_size=problem.batch_size, data=data)
    w0 = [{"W": jnp.asarray(W), "b": jnp.asarray(b)} for W, b in problem.weights]
    dyn = hg.Dynamics(w0, dyn.loss, dyn.optimizer, dyn.optimizer_hparams, dyn.data, dyn.steps)
    lam = {k: jnp.asarray(v) for k, v in problem.hparams().items()}
    return dyn, objective, lam


def first_m_lr_problem(dyn, lam, m: int):
    """λ = the first m entries of the flattened (T, L) lr schedule; the others, log_l2 and μ fixed."""
    import jax.numpy as jnp

    import hypergradient as hg

    T, L = lam["lr"].shape
    if not 1 <= m <= T * L:
        raise SystemExit(f"--m {m} must lie in [1, T*L = {T * L}]")
    fixed = lam

    def hparams(free, t):
        lr = jnp.concatenate([free["lr_first"], fixed["lr"].reshape(-1)[m:]]).reshape(T, L)
        return {"lr": list(lr[t]), "momentum": list(fixed["momentum"][t])}

    def loss(w, free, batch):
        return dyn.loss(w, fixed, batch)

    small = hg.Dynamics(dyn.init, loss, dyn.optimizer, hparams, dyn.data, dyn.steps)
    return small, {"lr_first": fixed["lr"].reshape(-1)[:m]}


def full_shape_grads(name, grad, lam, m=None) -> dict:
    """The method's gradient as {log_l2, lr, momentum} numpy arrays where it has them.

    forward-4lr gives d/d lr_layer = Σ_t d/d lr[t, l]: returned as ``lr_layer``.
    """
    if name == "forward-4lr":
        return {"lr_layer": np.asarray(grad["lr_layer"])}
    if name in ("forward-m", "reverse-m"):
        return {"lr_first": np.asarray(grad["lr_first"])}
    return {k: np.asarray(grad[k]) for k in common.HPARAM_KEYS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=METHOD_NAMES)
    ap.add_argument("--problem", required=True, help=".npz written by common.save_problem")
    ap.add_argument("--dtype", choices=("float32", "float64"), default=None,
                    help="default: the file's dtype (float64 turns on jax_enable_x64)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--truncate", type=int, default=10)
    ap.add_argument("--m", type=int, default=4, help="hyperparameters of reverse-m / forward-m")
    ap.add_argument("--no-train", action="store_true", help="time the hypergradient only")
    ap.add_argument("--cache-dir", default=None,
                    help="JAX persistent compilation cache (saves recompiling in every process)")
    ap.add_argument("--save-grads", help="write value and hypergradient to this .npz")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)

    load_at_start = os.getloadavg()[0]
    problem = common.load_problem(args.problem, dtype=args.dtype)

    import jax

    if problem.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import hypergradient as hg
    from hypergradient.methods import base

    dyn, objective, lam = from_problem(problem)
    if args.name == "forward-4lr":
        from b1_schedules import per_layer_lr_problem

        dyn, lam = per_layer_lr_problem(dyn, lam)
    elif args.name in ("forward-m", "reverse-m"):
        dyn, lam = first_m_lr_problem(dyn, lam, args.m)
    method = make_method(args.name, args)
    stats, compile_info = {}, {}

    def prepare():
        # Compile without running, so that the cold call's peak is the run's.
        _, compile_info["seconds"], _ = base.compiled(dyn, objective, lam=lam, method=method)

    def hypergrad():
        res = hg.hypergrad(dyn, objective, lam, method)
        stats.update(res.stats)
        return float(res.value), full_shape_grads(args.name, res.grad, lam)

    def train():
        return jax.block_until_ready(dyn.run(lam))

    timing = common.measure(train, hypergrad, repeats=args.repeats, with_train=not args.no_train,
                            prepare=prepare)
    grads = timing.pop("grads")
    record = {
        "impl": "ours",
        "name": args.name,
        "method": repr(method),
        "T": problem.T,
        "dtype": problem.dtype,
        "repeats": args.repeats,
        "m": sum(int(np.size(x)) for x in jax.tree.leaves(lam)),
        **timing,
        "xla_temp_mb": stats.get("temp_bytes", -1) / 2**20,
        "compile_seconds": compile_info.get("seconds"),
        "method_stats": {k: v for k, v in stats.items()
                         if isinstance(v, (int, float)) and k not in ("seconds", "compile_seconds")},
        "grad_norms": {k: float(np.linalg.norm(g)) for k, g in grads.items()},
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpus_available": len(os.sched_getaffinity(0)),
        "load_avg_1min_start": load_at_start,
        "load_avg_1min": os.getloadavg()[0],
    }
    if args.save_grads:
        np.savez(args.save_grads, value=np.float64(record["value"]), **grads)
    if args.json:
        print(json.dumps(record))
    else:
        for k, v in record.items():
            print(f"{k:18s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
