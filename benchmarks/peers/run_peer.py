"""Time one PyTorch peer on B1 in its own process and report one JSON line.

A process of its own per implementation makes the peak resident memory
(VmHWM) that implementation's. The protocol is ``common.measure``, the
same as ``benchmarks/run_ours.py``: a warm-up training run, then a cold
hypergradient whose peak less the resident memory just before is
``peak_rss_delta_mb``, then ``--repeats`` alternating timed rounds.

    python benchmarks/peers/run_peer.py torch_plain --T 100 --repeats 5 --json
    python benchmarks/peers/run_peer.py torch_higher --problem b1.npz --json \
        --save-grads higher.npz

With ``--problem`` every implementation gets the same data, initial weights
and hyperparameters (``common.save_problem``); without it the problem is
built from the Fashion-MNIST IDX files with ``common.make_b1``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
from pathlib import Path

# libgomp's threads spin while they wait. On a machine shared with other
# jobs a spinning thread holds a core that the thread it waits for needs,
# and runs of this small MLP slowed 10-50x (seen with 2 threads under a load
# of 5). Passive waiting must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers import PEERS, common  # noqa: E402


def build_problem(args) -> common.B1Problem:
    if args.problem:
        problem = common.load_problem(args.problem, dtype=args.dtype)
        if args.T is not None and args.T != problem.T:
            raise SystemExit(f"--T {args.T} differs from T={problem.T} in {args.problem}")
        return problem
    data = common.load_fashion_mnist(args.data_dir, n_train=10000, n_val=10000)
    return common.make_b1(
        *data, T=args.T or 100, batch_size=200, dtype=args.dtype or "float32", seed=args.seed
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=PEERS)
    ap.add_argument("--T", type=int, default=None, help="steps (default 100, or the file's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=("float32", "float64"), default=None,
                    help="default float32, or the file's dtype")
    ap.add_argument("--problem", help=".npz written by common.save_problem")
    ap.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    ap.add_argument("--seed", type=int, default=0, help="initial weights without --problem")
    ap.add_argument("--save-grads", help="write value and hypergradient to this .npz")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--no-train", action="store_true", help="time the hypergradient only")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)

    load_at_start = os.getloadavg()[0]
    problem = build_problem(args)
    module = importlib.import_module(f"benchmarks.peers.{args.name}")
    import torch

    torch.set_num_threads(args.threads)
    timing = common.measure(
        lambda: module.train(problem),
        lambda: module.hypergrad(problem),
        repeats=args.repeats,
        with_train=not args.no_train,
    )
    grads = timing.pop("grads")
    record = {
        "impl": args.name,
        "name": args.name,
        "method": "unrolled reverse (autograd, create_graph=True)",
        "T": problem.T,
        "dtype": problem.dtype,
        "repeats": args.repeats,
        **timing,
        "grad_norms": {k: float(np.linalg.norm(g)) for k, g in grads.items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
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
