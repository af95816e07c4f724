"""Check that the PyTorch peers compute the same hypergradient, in float64.

Builds a small B1 with ``b1.arrays`` (1000 training and 1000 validation
rows, batch 100, float64) and random hyperparameters, runs the three peers, and prints for each the largest
difference of its hypergradient from torch_plain's, relative to the largest
entry of torch_plain's (per hyperparameter), and central finite differences
of the objective on a few coordinates. Exits 1 if a peer differs by more
than --tol.

    python -m benchmarks.peers.check_agreement [--T 10] [--tol 1e-8]
"""

from __future__ import annotations

import argparse
import importlib
import sys

import numpy as np

from benchmarks import b1
from benchmarks.peers import PEERS, common


def small_problem(T=10, n_train=1000, n_val=1000, batch_size=100):
    data = b1.load_data(n_train=n_train, n_val=n_val)
    prob = b1.arrays(steps=T, batch_size=batch_size, dtype="float64", data=data)
    rng = np.random.default_rng(1)
    # Hyperparameters away from the constant defaults, so that every entry
    # of the tables matters and a mix-up of steps or layers shows.
    L = prob.n_layers
    prob = prob.replace(
        log_l2=rng.uniform(-5.0, -3.0, L),
        lr=rng.uniform(0.2, 0.6, (T, L)),
        momentum=rng.uniform(0.5, 0.95, (T, L)),
    )
    return prob, data.name


def objective(plain, problem):
    return common.validation_loss(problem, plain.train(problem))


def finite_difference(plain, problem, key, index, h):
    def at(delta):
        arr = getattr(problem, key).copy()
        arr[index] += delta
        return objective(plain, problem.replace(**{key: arr}))

    return (at(h) - at(-h)) / (2 * h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-8)
    args = ap.parse_args(argv)

    problem, source = small_problem(T=args.T)
    print(f"B1 small: {source} data, N_train={len(problem.y_train)}, "
          f"N_val={len(problem.y_val)}, B={problem.batch_size}, T={problem.T}, float64")
    modules = {name: importlib.import_module(f"benchmarks.peers.{name}") for name in PEERS}
    plain = modules["torch_plain"]
    results = {name: m.hypergrad(problem) for name, m in modules.items()}
    ref_value, ref = results["torch_plain"]

    ok = True
    print(f"\nvalue (torch_plain) = {ref_value:.17g}; "
          f"numpy at train(): {objective(plain, problem):.17g}")
    print("\nmax |g - g_plain| / max |g_plain|:")
    for name, (value, grads) in results.items():
        rel = common.relative_difference(grads, ref)
        dv = abs(value - ref_value) / abs(ref_value)
        worst = max(max(rel.values()), dv)
        ok &= worst <= args.tol
        cells = "  ".join(f"{k}={v:.2e}" for k, v in rel.items())
        print(f"  {name:15s} value={dv:.2e}  {cells}  {'ok' if worst <= args.tol else 'FAIL'}")

    T, L = problem.lr.shape
    coords = [("log_l2", (0,)), ("log_l2", (L - 1,)), ("lr", (0, 0)), ("lr", (T - 1, L - 1)),
              ("momentum", (0, 1)), ("momentum", (T // 2, 2))]
    print("\ncentral finite differences (h = 1e-5) vs torch_plain:")
    for key, idx in coords:
        fd = finite_difference(plain, problem, key, idx, 1e-5)
        g = ref[key][idx]
        print(f"  {key}{list(idx)}: autograd={g:+.12e}  fd={fd:+.12e}  "
              f"rel={abs(fd - g) / abs(g):.1e}")
    print("\nagreement:", "ok" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
