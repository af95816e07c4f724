"""Time one PyTorch peer on B1 in its own process and report one JSON line.

A process of its own per implementation makes the peak resident memory
(VmHWM) that implementation's. The protocol is ``common.measure``, the
same as ``benchmarks.run_ours``: a warm-up training run, then a cold
hypergradient whose peak less the resident memory just before is
``peak_rss_delta_mb``, then ``--repeats`` alternating timed rounds.

    python -m benchmarks.b1 --write b1.npz --steps 100
    python -m benchmarks.peers.run_peer torch_plain --problem b1.npz --repeats 5 --json
    python -m benchmarks.peers.run_peer torch_higher --problem b1.npz --json \
        --save-grads higher.npz

The problem is the .npz that ``python -m benchmarks.b1 --write`` saves, so every
implementation gets the same data, initial weights and hyperparameters.
PyTorch runs at its defaults unless ``--threads`` (intra-op threads) or
``--omp-passive`` (``OMP_WAIT_POLICY=PASSIVE``: libgomp's waiting threads
sleep instead of spinning) asks otherwise; the record says which.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from benchmarks.peers import PEERS, common
from benchmarks.record import emit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=PEERS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=("float32", "float64"), default=None, help="default: the file's dtype")
    ap.add_argument("--problem", required=True, help=".npz written by python -m benchmarks.b1 --write")
    ap.add_argument("--save-grads", help="write value and hypergradient to this .npz")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE (default: libgomp's own)")
    ap.add_argument("--no-train", action="store_true", help="time the hypergradient only")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)

    load_at_start = os.getloadavg()[0]
    problem = common.load_problem(args.problem, dtype=args.dtype)
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when torch loads libgomp, just below
    module = importlib.import_module(f"benchmarks.peers.{args.name}")
    import torch

    if args.threads:
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
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    emit(record, grads, load_at_start=load_at_start, save_grads=args.save_grads, json_line=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
