"""Data attribution measured by the linear datamodeling score (LDS): our exact metagradient scores
(``hg.attribute``, MAGIC) against influence functions and TracIn on the same problems.

LDS (Park et al. 2023; Ilyas & Engstrom 2025): train on M random subsets S_1..S_M of the training
set (halves, and 90% subsets: ``--keep``; example weights u ∈ {0, 1}^n, the M runs one vmapped
population), record each run's validation losses, and Spearman-correlate them with each
method's linear prediction Σ_{i∈S} score_i. Two figures per method: the LDS of the mean validation loss (one score vector), and the
mean over validation examples of each example's LDS (a row of scores per validation example).

Methods, every score meaning ∂(validation loss)/∂(weight of example i):

- ``metagradient``: ``hg.attribute`` by Reverse through the whole run (exact);
- ``influence``: −(1/n) ∇V(w_T)ᵀ (H + δI)⁻¹ ∇ℓ_i(w_T), H the Hessian of the training loss at
  w_T, solved by conjugate gradients (``jax.scipy.sparse.linalg.cg``);
- ``tracin``: −Σ_c η_c (k/n) ∇V(w_c)·∇ℓ_i(w_c) over checkpoints w_c every k steps;
- ``bergson``: EleutherAI's MAGIC (PyTorch) on the same run, in its own environment
  (``benchmarks/peers/bergson_magic.py``, given the data, initial weights, each step's examples
  and hyperparameters in a file); the LDS against the same retrained subsets. Skipped, with a
  message, where its environment (``--bergson-python``) is missing.

Time is each method's seconds (compiled, the median of ``--repeats`` calls) as a multiple of one
training run's (ours, in JAX); memory is XLA's peak temporary memory of its program, for Bergson
the growth of the process's peak resident memory over its first scoring call.

    nice -n 10 python -m benchmarks.attribution                     # logistic and MLP on digits
    python -m benchmarks.attribution --problems mlp-fashion --subsets 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import hypergradient as hg
from hypergradient.apps import datasets, models
from hypergradient.example_weights import weighted
from hypergradient.hypergrad import temp_bytes

PROBLEMS = ("logistic-digits", "mlp-digits", "mlp-fashion")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BERGSON_PYTHON = os.environ.get("BERGSON_PYTHON", os.path.join(ROOT, ".venv-bergson", "bin", "python"))


def per_example_ce(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]


def build(name: str, n_train: int, n_val: int, seed: int = 0):
    """The problem: ``(dyn, lam, val_losses(w, λ) -> (n_val,), example_loss(w, x, y) -> (n,), (x, y), lr, peer)``,
    ``peer`` the arrays a peer needs to train the same run (data, initial weights, each step's
    example ids, hyperparameters)."""
    data = datasets.load("digits" if name.endswith("digits") else "fashion-mnist", n_train=n_train, n_val=n_val,
                         n_test=1 if name.endswith("fashion") else None)
    x, y = jnp.asarray(data.train.x), jnp.asarray(data.train.y)
    xv, yv = jnp.asarray(data.val.x), jnp.asarray(data.val.y)
    classes = data.n_classes
    if name.startswith("logistic"):
        w0 = models.softmax_regression_init(x.shape[1], classes)
        apply = models.softmax_regression_apply
        lr, steps, activation = 0.5, 200, "none"
    else:
        w0 = models.mlp_init(jax.random.key(seed), (x.shape[1], 64, classes))
        apply = lambda w, x: models.mlp_apply(w, x, jax.nn.silu)  # noqa: E731
        lr, steps, activation = 0.1, 300, "silu"
    l2, momentum = 1e-3, 0.9

    def example_loss(w, x, y):
        return per_example_ce(apply(w, x), y)

    def loss(w, lam, batch, *, example_weights=1.0):
        bx, by = batch
        return jnp.mean(example_weights * example_loss(w, bx, by)) + 0.5 * lam["l2"] * sum(
            jnp.sum(layer["W"] ** 2) for layer in w)

    def val_losses(w, lam):
        return example_loss(w, xv, yv)

    dyn = hg.Dynamics(w0, loss, hg.optim.momentum(), lambda lam, t: {"lr": lr, "momentum": momentum},
                      data=hg.Batches((x, y), 100, key=jax.random.key(seed)), steps=steps)
    peer = {"x": x, "y": y, "xv": xv, "yv": yv, "depth": len(w0), "activation": activation, "lr": lr,
            "momentum": momentum, "l2": l2, "batches": jnp.stack([dyn.data.indices(t) for t in range(steps)]),
            **{f"{k}{i}": layer[k] for i, layer in enumerate(w0) for k in ("W", "b")}}
    return dyn, {"l2": jnp.asarray(l2)}, val_losses, example_loss, (x, y), lr, peer


def timed(fn, *args, repeats: int):
    """``(output, median seconds, XLA temp bytes)`` of the compiled ``fn``."""
    exe = jax.jit(fn).lower(*args).compile()
    out = jax.block_until_ready(exe(*args))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(exe(*args))
        seconds.append(time.perf_counter() - start)
    return out, float(np.median(seconds)), temp_bytes(exe)


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def outcomes(dyn, lam, val_losses, masks, chunk: int = 50):
    """Validation losses after training on each subset, ``(M, n_val)``: the runs as vmapped
    populations of ``chunk`` members."""
    run = weighted(dyn)
    population = jax.jit(jax.vmap(lambda u: val_losses(run.run((lam, u)), lam)))
    return np.concatenate([np.asarray(population(jnp.asarray(masks[i:i + chunk])))
                           for i in range(0, len(masks), chunk)])


def influence(dyn, lam, val_losses, example_loss, xy, w_T, damping: float = 1e-3, iters: int = 100):
    """Influence-function scores at w_T, ``(n_val, n)`` rows and the mean-loss vector ``(n,)``."""
    x, y = xy
    flat, unravel = ravel_pytree(w_T)
    n = x.shape[0]

    def train_loss(v):
        return dyn.loss(unravel(v), lam, (x, y))

    def hvp(v):
        return jax.jvp(jax.grad(train_loss), (flat,), (v,))[1] + damping * v

    def solve(g):
        return jax.scipy.sparse.linalg.cg(hvp, g, maxiter=iters)[0]

    val_grads = jax.jacrev(lambda v: val_losses(unravel(v), lam))(flat)  # (n_val, d)
    train_grads = jax.vmap(jax.grad(lambda v, xi, yi: example_loss(unravel(v), xi[None], yi[None])[0]),
                           (None, 0, 0))(flat, x, y)  # (n, d)
    rows = -jax.vmap(solve)(val_grads) @ train_grads.T / n
    mean = -solve(val_grads.mean(0)) @ train_grads.T / n
    return rows, mean


def tracin(dyn, lam, val_losses, example_loss, xy, lr: float, every: int):
    """TracIn scores over checkpoints every ``every`` steps, ``(n_val, n)`` and ``(n,)``."""
    x, y = xy
    n = x.shape[0]

    def segment(state, c):
        state, _ = dyn.rollout(state, lam, c * every, every)
        return state, state.params

    _, checkpoints = jax.lax.scan(segment, dyn.initial_state(lam), jnp.arange(dyn.steps // every))

    def at(w):
        flat, unravel = ravel_pytree(w)
        val = jax.jacrev(lambda v: val_losses(unravel(v), lam))(flat)
        train = jax.vmap(jax.grad(lambda v, xi, yi: example_loss(unravel(v), xi[None], yi[None])[0]),
                         (None, 0, 0))(flat, x, y)
        return -lr * every / n * val @ train.T

    rows = jax.lax.map(at, checkpoints).sum(0)
    return rows, rows.mean(0)


def bergson(peer: dict, python: str, per_query: bool, repeats: int, threads: int | None = None) -> dict | str:
    """Bergson's MAGIC scores of the same run, computed by ``benchmarks.peers.bergson_magic`` in
    Bergson's own environment (``python``): its output arrays, or why it was not measured."""
    if not os.path.exists(python):
        return f"not measured: no Bergson environment at {python} (benchmarks/README.md says how to make one)"
    with tempfile.TemporaryDirectory() as tmp:
        problem, out = os.path.join(tmp, "problem.npz"), os.path.join(tmp, "bergson.npz")
        np.savez(problem, **{k: np.asarray(v) for k, v in peer.items()})
        cmd = [python, "-m", "benchmarks.peers.bergson_magic", "--problem", problem, "--out", out,
               "--repeats", str(repeats)] + (["--per-query"] if per_query else []) + (
                  ["--threads", str(threads)] if threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            return f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
        with np.load(out) as f:
            return {k: f[k] for k in f.files}


def subsets(n: int, count: int, keep: float, seed: int) -> np.ndarray:
    """``count`` weight vectors in {0, 1}^n, each keeping ``round(keep·n)`` random examples."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, n), np.float32)
    for m in masks:
        m[rng.permutation(n)[: round(keep * n)]] = 1
    return masks


def measure(name: str, args) -> list[dict]:
    dyn, lam, val_losses, example_loss, xy, lr, peer = build(name, args.n_train, args.n_val)
    n = xy[0].shape[0]

    def train(dyn, lam):
        return hg.dynamics.train(dyn, lam)[0].params

    w_T, train_seconds, train_bytes = timed(train, dyn, lam, repeats=args.repeats)

    def objective(w, lam):
        return jnp.mean(val_losses(w, lam))

    rows = {}
    mean_scores = hg.attribute(dyn, objective, lam)
    seconds = [hg.attribute(dyn, objective, lam).stats["seconds"] for _ in range(args.repeats)]
    per_val = hg.attribute(dyn, val_losses, lam, chunk_size=args.chunk)
    rows["metagradient"] = (mean_scores.scores, per_val.scores, float(np.median(seconds)),
                            per_val.stats["seconds"], mean_scores.stats["temp_bytes"])

    (if_rows, if_mean), if_seconds, if_bytes = timed(
        lambda d, l, w: influence(d, l, val_losses, example_loss, xy, w), dyn, lam, w_T, repeats=args.repeats)
    rows["influence"] = (if_mean, if_rows, if_seconds, if_seconds, if_bytes)
    (tr_rows, tr_mean), tr_seconds, tr_bytes = timed(
        lambda d, l: tracin(d, l, val_losses, example_loss, xy, lr, args.every), dyn, lam, repeats=args.repeats)
    rows["tracin"] = (tr_mean, tr_rows, tr_seconds, tr_seconds, tr_bytes)

    peer_out = bergson(peer, args.bergson_python, args.bergson_per_query, args.bergson_repeats, args.bergson_threads)
    if isinstance(peer_out, str):
        print(f"Bergson {peer_out}", flush=True)
    else:
        ours = np.asarray(mean_scores.scores)
        extra = {"bergson_seconds": float(peer_out["mean_total_seconds"]),
                 "bergson_backward_seconds": float(peer_out["backward_seconds"]),
                 "bergson_train_seconds": float(peer_out["train_seconds"]),
                 "x_bergson_train": float(peer_out["mean_total_seconds"] / peer_out["train_seconds"]),
                 "torch_train_seconds": float(peer_out["torch_train_seconds"]),
                 "x_torch_train": float(peer_out["mean_total_seconds"] / peer_out["torch_train_seconds"]),
                 "torch_threads": int(peer_out["threads"]),
                 "x_ours": float(peer_out["mean_total_seconds"]) / float(np.median(seconds)),
                 "peak_rss_growth_mb": float(peer_out["peak_rss_growth_mb"]),
                 "max_rel_diff_from_ours": float(np.abs(peer_out["mean"] - ours).max() / np.abs(ours).max()),
                 "versions": f"bergson {peer_out['bergson']}, torch {peer_out['torch']}",
                 "repeats": args.bergson_repeats}
        per = peer_out.get("rows")
        rows["bergson"] = (peer_out["mean"], per, float(peer_out["mean_total_seconds"]),
                           float(peer_out["per_query_seconds"]) if per is not None else None, None, extra)

    records = []
    for keep in map(float, args.keep.split(",")):
        masks = subsets(n, args.subsets, keep, args.seed)
        start = time.perf_counter()
        actual = outcomes(dyn, lam, val_losses, masks)
        population_seconds = time.perf_counter() - start
        for method, (mean, per, s_mean, s_rows, nbytes, *extra) in rows.items():
            mean = np.asarray(mean)
            lds_mean = spearman(actual.mean(1), masks @ mean)
            lds_rows = None if per is None else float(
                np.mean([spearman(actual[:, j], masks @ np.asarray(per)[j]) for j in range(len(per))]))
            records.append({"problem": name, "keep": keep, "method": method, "lds_mean_loss": lds_mean,
                            "lds_per_example": lds_rows, "x_train_mean": s_mean / train_seconds,
                            "x_train_rows": None if s_rows is None else s_rows / train_seconds,
                            "temp_mb": None if nbytes is None else nbytes / 2**20,
                            "train_seconds": train_seconds, "train_temp_mb": train_bytes / 2**20, "n_train": n,
                            "n_val": args.n_val, "subsets": args.subsets, "population_seconds": population_seconds,
                            **(extra[0] if extra else {})})
    if isinstance(peer_out, str):
        records.append({"problem": name, "keep": "", "method": "bergson", "note": peer_out})
    return records


def table(records: list[dict]) -> str:
    lines = ["| problem | kept | method | LDS, mean val loss | LDS, per val example | time ÷ one run (mean loss) "
             "| time ÷ one run (all rows) | temp memory (MB) |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "note" in r:
            lines.append(f"| {r['problem']} | | {r['method']} | {r['note']} | | | | |")
            continue
        def cell(key, fmt):
            return "—" if r.get(key) is None else format(r[key], fmt)

        memory = cell("temp_mb", ".2f") if "peak_rss_growth_mb" not in r else f"RSS +{r['peak_rss_growth_mb']:.1f}"
        lines.append(f"| {r['problem']} | {r['keep']:.0%} | {r['method']} | {r['lds_mean_loss']:.3f} "
                     f"| {cell('lds_per_example', '.3f')} | {r['x_train_mean']:.1f} | {cell('x_train_rows', '.1f')} "
                     f"| {memory} |")
    described = set()
    for r in records:
        if "x_ours" in r and r["problem"] not in described:
            described.add(r["problem"])
            lines.append(f"\n{r['problem']}, Bergson ({r['versions']}): {r['bergson_seconds']:.1f} s, "
                         f"{r['x_ours']:.0f}x our metagradient's time, {r['x_bergson_train']:.1f}x its own training "
                         f"run ({r['bergson_train_seconds']:.2f} s), {r['x_torch_train']:.1f}x a plain PyTorch "
                         f"training loop ({r['torch_train_seconds']:.3f} s; {r['torch_threads']} torch threads); its "
                         f"scores differ from ours by {r['max_rel_diff_from_ours']:.1e} of the largest")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default="logistic-digits,mlp-digits", help=f"comma-separated, of {PROBLEMS}")
    parser.add_argument("--subsets", type=int, default=100, help="M random subsets of the training set")
    parser.add_argument("--keep", default="0.5,0.9", help="comma-separated fractions of the examples a subset keeps")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=50, help="validation rows per backward batch (ours)")
    parser.add_argument("--every", type=int, default=20, help="TracIn: steps between checkpoints")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bergson-python", default=BERGSON_PYTHON,
                        help="Python of the environment with bergson and torch (default: $BERGSON_PYTHON, else "
                             ".venv-bergson/bin/python); Bergson is skipped with a message where it is missing")
    parser.add_argument("--bergson-repeats", type=int, default=1, help="Bergson's timed scoring runs (median)")
    parser.add_argument("--bergson-threads", type=int, default=None,
                        help="torch intra-op threads in Bergson's process (default: torch's own)")
    parser.add_argument("--bergson-per-query", action="store_true",
                        help="Bergson's per-query mode too: one backward pass per validation example (slow)")
    parser.add_argument("--out", help="write the records as JSON here")
    args = parser.parse_args(argv)
    records = []
    for name in args.problems.split(","):
        if name not in PROBLEMS:
            parser.error(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}")
        records += measure(name, args)
        print(table(records), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
