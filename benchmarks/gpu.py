"""B1 on one accelerator: every method of ours and plain PyTorch, timed alike, one markdown table.

The problem is ``b1``'s B1 (Fashion-MNIST, or scikit-learn's digits with ``--digits``), the same
arrays for both libraries; each implementation is timed
by ``common.measure`` (a warm-up, then training and hypergradient alternately, medians), and each
hypergradient is compared with our Reverse's (max |g − g_ref| / max |g_ref| over the
hyperparameters). Run by ``benchmarks/gpu.sh``; writes ``b1_gpu.json`` and ``b1_gpu.md`` to ``--out``.

    python -m benchmarks.gpu --out DIR [--device gpu] [--steps 100] [--repeats 5] [--digits]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np

from benchmarks import b1
from benchmarks.peers import common


def measure_ours(problem, repeats: int) -> dict:
    import jax

    import hypergradient as hg

    dyn, objective, lam = b1.build(problem)
    rows = {  # name: (method, JAX's matmul precision; None: the library's default, full)
        "Reverse": (hg.Reverse(), None),
        "Reverse, tensorfloat32": (hg.Reverse(), "tensorfloat32"),
        "Reverse(checkpoint_every=10)": (hg.Reverse(checkpoint_every=10), None),
        "Truncated(10)": (hg.Truncated(10), None),
        "Forward (4 per-layer lrs)": (hg.Forward(), None),
        "Reversible": (hg.Reversible(), None),
        "DrMAD": (hg.DrMAD(), None),
    }
    out = {}
    for name, (method, precision) in rows.items():
        d, l = b1.per_layer_lr(dyn, lam) if name.startswith("Forward") else (dyn, lam)

        def hypergrad():
            res = hg.hypergrad(d, objective, l, method)
            return float(res.value), {k: np.asarray(v) for k, v in res.grad.items()} if isinstance(res.grad, dict) else {}

        def train():
            return jax.block_until_ready(d.run(l))

        try:
            with jax.default_matmul_precision(precision) if precision else _nothing():
                out[name] = common.measure(train, hypergrad, repeats=repeats)
        except Exception as e:  # a method that refuses (Reversible, DrMAD) is a result too
            out[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0], "traceback": traceback.format_exc()}
        print(f"ours {name}: {_summary(out[name])}", file=sys.stderr)
    return out


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def torch_on(device: str):
    """Plain PyTorch's B1 (``peers.torch_plain``) with its tensors on ``device``: the peer is
    written for CPU tensors, so its data, weights and read-backs are redirected here."""
    import torch

    from benchmarks.peers import _torch as tu, torch_plain

    torch.set_default_device(device)  # initial_params, hparam_leaves, zeros_like
    data_init, to_numpy, grads_to_numpy = tu.Data.__init__, tu.to_numpy_weights, tu.grads_to_numpy

    def on_device(self, problem):
        data_init(self, problem)
        for k in ("x_train", "y_train", "x_val", "y_val"):
            setattr(self, k, getattr(self, k).to(device))

    tu.Data.__init__ = on_device
    tu.to_numpy_weights = lambda params: to_numpy([p.detach().cpu() for p in params])
    tu.grads_to_numpy = lambda keys, grads: grads_to_numpy(keys, [g.cpu() for g in grads])
    tu.as_float = lambda x: float(x.detach().cpu())
    return torch_plain


def _summary(r: dict) -> str:
    return r["error"] if "error" in r else f"train {r['train_s'] * 1e3:.1f} ms, hypergradient {r['hypergrad_s'] * 1e3:.1f} ms"


NOTES = {
    "ours: Reverse, tensorfloat32": "with jax.default_matmul_precision(\"tensorfloat32\")",
    "ours: Truncated(10)": "biased by design",
    "ours: Forward (4 per-layer lrs)": "λ = 4 per-layer learning rates",
    "ours: DrMAD": "approximate by design",
}


def markdown(report: dict) -> str:
    ref = report["results"].get("ours: Reverse", {}).get("grads")
    lines = [
        f"B1 (T = {report['steps']}, {report['data']}) on {report['device_name']}; jax {report['jax']}, "
        f"torch {report['torch']}; medians of {report['repeats']} alternating calls.",
        "",
        "| implementation | training | hypergradient | ratio | max rel. diff from Reverse | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {name} | | | | | {r['error']} |")
            continue
        diff = "—"
        if ref and set(r["grads"]) == set(ref):
            diff = f"{max(common.relative_difference(r['grads'], ref).values()):.1e}"
        lines.append(f"| {name} | {r['train_s'] * 1e3:.1f} ms | {r['hypergrad_s'] * 1e3:.1f} ms | {r['ratio']:.2f} | {diff} "
                     f"| {NOTES.get(name, '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for b1_gpu.json and b1_gpu.md")
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--digits", action="store_true", help="scikit-learn's digits instead of Fashion-MNIST")
    ap.add_argument("--no-torch", action="store_true", help="ours only")
    args = ap.parse_args(argv)

    import jax

    if jax.default_backend() != args.device:
        raise SystemExit(f"gpu.py: asked for {args.device}, but JAX's default backend is {jax.default_backend()}")
    from hypergradient.apps import datasets

    problem = b1.arrays(steps=args.steps, data=datasets.load("digits") if args.digits else b1.load_data())
    results = {f"ours: {k}": v for k, v in measure_ours(problem, args.repeats).items()}
    torch_version = "not run"
    if not args.no_torch:
        import torch

        torch_version = torch.__version__
        peer = torch_on("cuda" if args.device == "gpu" else "cpu")
        results["plain PyTorch"] = common.measure(lambda: peer.train(problem), lambda: peer.hypergrad(problem), args.repeats)
        print(f"plain PyTorch: {_summary(results['plain PyTorch'])}", file=sys.stderr)
    report = {
        "benchmark": "B1 on one accelerator",
        "steps": args.steps,
        "data": "digits" if args.digits else "Fashion-MNIST",
        "repeats": args.repeats,
        "device_name": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "torch": torch_version,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    (out / "b1_gpu.md").write_text(table)
    for r in results.values():
        r.pop("grads", None)
    (out / "b1_gpu.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
