"""Time one of our hypergradient methods on B1 in its own process; one JSON line.

The counterpart of ``benchmarks.peers.run_peer``, with the same
interface and the same measuring protocol (``common.measure``): a warm-up
training run (which compiles it), the hypergradient program compiled ahead
of time, a cold hypergradient call whose peak resident memory less the
memory just before is ``peak_rss_delta_mb``, then ``--repeats`` alternating
timed rounds of training and hypergradient. A process per method makes the
peak its own.

The problem is the .npz that ``python -m benchmarks.b1 --write`` saves (every implementation
reads the same file); ``b1.build`` makes our dynamics and objective from it.

    python -m benchmarks.run_ours reverse --problem b1.npz --json --save-grads ours.npz
    python -m benchmarks.run_ours forward --hparams first-m-lr --m 64 --problem b1.npz --no-train --json

METHOD is a name of ``hypergradient.apps.methods`` (``--checkpoint-every``
and ``--truncate`` set checkpoint's and truncated's parameter). ``--hparams``
says which λ is differentiated (``b1.HPARAMS``): all 4 + 8T hyperparameters,
the 4 per-layer learning rates, or the first m entries of the flattened (T, 4)
learning-rate schedule; by default Forward gets the 4 per-layer learning
rates and every other method all of them (``b1.measured_on``).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from benchmarks.peers import common
from benchmarks.record import emit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", metavar="METHOD", help="a name of hypergradient.apps.methods")
    ap.add_argument("--problem", required=True, help=".npz written by python -m benchmarks.b1 --write")
    ap.add_argument("--dtype", choices=("float32", "float64"), default=None,
                    help="default: the file's dtype (float64 turns on jax_enable_x64)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--truncate", type=int, default=10)
    ap.add_argument("--hparams", default=None, help="which λ: all, per-layer-lr or first-m-lr (b1.HPARAMS)")
    ap.add_argument("--m", type=int, default=4, help="m of --hparams first-m-lr")
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
    from benchmarks import b1
    from hypergradient.apps.methods import make
    from hypergradient.hypergrad import compiled

    hparams = args.hparams or b1.measured_on(args.name)
    if hparams not in b1.HPARAMS:
        raise SystemExit(f"--hparams {hparams}: not one of {', '.join(b1.HPARAMS)}")
    dyn, objective, lam = b1.build(problem)
    dyn, lam = b1.HPARAMS[hparams](dyn, lam, args.m)
    method = make(args.name, truncation=args.truncate, checkpoint_every=args.checkpoint_every)
    stats, compile_info = {}, {}

    def prepare():
        # Compile without running, so that the cold call's peak is the run's.
        _, compile_info["seconds"], _ = compiled(dyn, objective, method, lam)

    def hypergrad():
        res = hg.hypergrad(dyn, objective, lam, method)
        stats.update(res.stats)
        return float(res.value), {k: np.asarray(g) for k, g in res.grad.items()}

    def train():
        return jax.block_until_ready(dyn.run(lam))

    timing = common.measure(train, hypergrad, repeats=args.repeats, with_train=not args.no_train,
                            prepare=prepare)
    grads = timing.pop("grads")
    record = {
        "impl": "ours",
        "name": args.name,
        "method": repr(method),
        "hparams": hparams,
        "T": problem.T,
        "dtype": problem.dtype,
        "repeats": args.repeats,
        "m": sum(int(np.size(x)) for x in jax.tree.leaves(lam)),
        **timing,
        "xla_temp_mb": stats.get("temp_bytes", -1) / 2**20,
        "compile_seconds": compile_info.get("seconds"),
        "method_stats": {k: v for k, v in stats.items()
                         if isinstance(v, (int, float)) and k not in ("seconds", "compile_seconds")},
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    emit(record, grads, load_at_start=load_at_start, save_grads=args.save_grads, json_line=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
