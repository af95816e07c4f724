"""Data attribution measured by the linear datamodeling score (LDS): our exact metagradient scores
(``hg.attribute``, MAGIC) against influence functions and TracIn on the same problems.

LDS (Park et al. 2023; Ilyas & Engstrom 2025): train on M random subsets S_1..S_M of the training
set (halves, and 90% subsets: ``--keep``; example weights u ∈ {0, 1}^n, the M runs one vmapped
population), record each run's validation losses, and Spearman-correlate them with each
method's linear prediction Σ_{i∈S} score_i. Two figures per method: the LDS of the mean
validation loss (one score vector), and the mean over validation examples of each example's LDS
(a row of scores per validation example; ``--mean-only`` skips it).

Methods, every score meaning ∂(validation loss)/∂(weight of example i):

- ``metagradient``: ``hg.attribute`` by Reverse through the whole run (exact; ``--second-order forward``:
  forward-over-reverse Hessian-vector products, the same scores in less memory);
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

Settings (``Setting``: learning rate, batch size, steps, the MLP's activation) default to each
problem's; ``--lr/--batch/--steps/--activation`` change them and ``--sweep FIELD=V1,V2`` adds
runs that change one field at a time. ``--diagnose K`` adds, per subset fraction, the LDS of the
best linear datamodel fitted on K further retrainings (ridge regression; about the most any
linear score, ours included, can reach, estimated from below: the fit's own error lowers it) and
of our scores taken at u = keep instead of u = 1. ``--leave-one-out`` adds the additive model of
the n exact single removals (n retrainings); ``--derivative-check`` prints the largest scores
against central differences of the run in their weights (a chaotic run shows there).

    nice -n 10 python -m benchmarks.attribution                     # logistic and MLP on digits
    nice -n 10 python -m benchmarks.attribution --problems mlp-digits --keep 0.5 --diagnose 4000
    nice -n 10 python -m benchmarks.attribution --problems mlp-digits --keep 0.5 --mean-only \\
        --diagnose 1000 --repeats 1 --sweep activation=relu --sweep lr=0.03,0.3
    nice -n 10 python -m benchmarks.attribution --problems mlp-fashion --mean-only --repeats 1
"""

from __future__ import annotations

import argparse
import dataclasses
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

PROBLEMS = ("logistic-digits", "mlp-digits", "mlp-fashion", "cnn-fashion")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BERGSON_PYTHON = os.environ.get("BERGSON_PYTHON", os.path.join(ROOT, ".venv-bergson", "bin", "python"))


def per_example_ce(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class Setting:
    """How the problem trains: heavy-ball momentum 0.9 at ``lr`` for ``steps`` steps on shuffled
    batches of ``batch`` examples (``batch`` = n: full batch), hidden units ``activation``."""

    lr: float
    steps: int
    batch: int = 100
    activation: str = "silu"

    def label(self) -> str:
        return f"lr {self.lr:g}, batch {self.batch}, {self.steps} steps, {self.activation}"


DEFAULTS = {"logistic-digits": Setting(0.5, 200), "mlp-digits": Setting(0.1, 300),
            "mlp-fashion": Setting(0.01, 300), "cnn-fashion": Setting(0.01, 200)}
ACTIVATIONS = {"silu": jax.nn.silu, "relu": jax.nn.relu, "tanh": jnp.tanh}


def build(name: str, n_train: int, n_val: int, setting: Setting | None = None, seed: int = 0):
    """The problem: ``(dyn, lam, val_losses(w, λ) -> (n_val,), example_loss(w, x, y) -> (n,), (x, y),
    val_error(w) -> fraction misclassified, peer)``, ``peer`` the arrays a peer needs to train the
    same run (data, initial weights, each step's example ids, hyperparameters; ``None`` for the
    CNN, which the peer does not build). ``setting``: the problem's default if not given."""
    setting = DEFAULTS[name] if setting is None else setting
    data = datasets.load("digits" if name.endswith("digits") else "fashion-mnist", n_train=n_train, n_val=n_val,
                         n_test=1 if name.endswith("fashion") else None)
    x, y = jnp.asarray(data.train.x), jnp.asarray(data.train.y)
    xv, yv = jnp.asarray(data.val.x), jnp.asarray(data.val.y)
    classes = data.n_classes
    if name.startswith("logistic"):
        w0 = models.softmax_regression_init(x.shape[1], classes)
        apply = models.softmax_regression_apply
    elif name.startswith("cnn"):
        if setting.activation != "silu":
            raise ValueError(f"the CNN's units are SiLU (models.cnn_apply), not {setting.activation}")
        w0 = models.cnn_init(jax.random.key(seed), (28, 28), classes)
        apply = models.cnn_apply
    else:
        w0 = models.mlp_init(jax.random.key(seed), (x.shape[1], 64, classes))
        act = ACTIVATIONS[setting.activation]
        apply = lambda w, x: models.mlp_apply(w, x, act)  # noqa: E731

    def example_loss(w, x, y):
        return per_example_ce(apply(w, x), y)

    def loss(w, lam, batch, *, example_weights=1.0):
        bx, by = batch
        return jnp.mean(example_weights * example_loss(w, bx, by)) + 0.5 * lam["l2"] * sum(
            jnp.sum(layer["W"] ** 2) for layer in w)

    # A pytree holding the validation examples: programs take them as arguments, not constants.
    val_losses = jax.tree_util.Partial(lambda xv, yv, w, lam: example_loss(w, xv, yv), xv, yv)

    def val_error(w):
        return models.error_rate(apply(w, xv), yv)

    l2, momentum = 1e-3, 0.9
    dyn = hg.Dynamics(w0, loss, hg.optim.momentum(), lambda lam, t: {"lr": setting.lr, "momentum": momentum},
                      data=hg.Batches((x, y), min(setting.batch, x.shape[0]), key=jax.random.key(seed)),
                      steps=setting.steps)
    peer = None if name.startswith("cnn") else {
        "x": x, "y": y, "xv": xv, "yv": yv, "depth": len(w0), "lr": setting.lr, "momentum": momentum, "l2": l2,
        "activation": "none" if name.startswith("logistic") else setting.activation,
        "batches": jnp.stack([dyn.data.indices(t) for t in range(setting.steps)]),
        **{f"{k}{i}": layer[k] for i, layer in enumerate(w0) for k in ("W", "b")}}
    return dyn, {"l2": jnp.asarray(l2)}, val_losses, example_loss, (x, y), val_error, peer


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
    population = jax.jit(lambda run, objective, lam, us: jax.vmap(lambda u: objective(run.run((lam, u)), lam))(us))
    run = weighted(dyn)
    return np.concatenate([np.asarray(population(run, val_losses, lam, jnp.asarray(masks[i:i + chunk])))
                           for i in range(0, len(masks), chunk)])


def influence(dyn, lam, val_losses, example_loss, xy, w_T, damping: float = 1e-3, iters: int = 100,
              rows: bool = True):
    """Influence-function scores at w_T, ``(n_val, n)`` rows (``None`` unless ``rows``) and the
    mean-loss vector ``(n,)``."""
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
    mean = -solve(val_grads.mean(0)) @ train_grads.T / n
    return (-jax.vmap(solve)(val_grads) @ train_grads.T / n if rows else None), mean


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


def datamodel_fit(masks: np.ndarray, outcome: np.ndarray) -> np.ndarray:
    """The best linear datamodel of the outcome, fitted on retrainings: ridge regression of
    ``outcome`` (M,) on ``masks`` (M, n), the penalty chosen by leave-one-out (scikit-learn's
    ``RidgeCV``); returns the coefficients, one per example."""
    from sklearn.linear_model import RidgeCV

    return RidgeCV(alphas=np.logspace(-4, 3, 15)).fit(masks, outcome).coef_


def derivative_check(dyn, lam, val_losses, scores, eps: float = 0.05, top: int = 10) -> np.ndarray:
    """The ``top`` largest scores beside central differences of the mean validation loss in each
    one's weight (u_i = 1 ± eps, the others 1): ``(top, 2)``. Equal columns: the score describes
    the run's trend at that scale; a score much larger than its difference: a chaotic run."""
    n = len(scores)
    idx = np.argsort(-np.abs(scores))[:top]
    masks = np.ones((2 * top, n), np.float32)
    masks[2 * np.arange(top), idx] += eps
    masks[2 * np.arange(top) + 1, idx] -= eps
    out = outcomes(dyn, lam, val_losses, masks, chunk=2 * top).mean(1)
    return np.stack([np.asarray(scores)[idx], (out[0::2] - out[1::2]) / (2 * eps)], 1)


def leave_one_out(dyn, lam, val_losses, value: float, n: int) -> np.ndarray:
    """−(f(u = 1 − e_i) − f(1)) for every example i, by n retrainings: the score (same sign) of an
    additive model built from exact single removals, not derivatives."""
    return value - outcomes(dyn, lam, val_losses, 1 - np.eye(n, dtype=np.float32)).mean(1)


def measure(name: str, setting: Setting, args) -> list[dict]:
    dyn, lam, val_losses, example_loss, xy, val_error, peer = build(name, args.n_train, args.n_val, setting,
                                                                    seed=args.seed)
    n = xy[0].shape[0]

    def train(dyn, lam):
        return hg.dynamics.train(dyn, lam)[0].params

    w_T, train_seconds, train_bytes = timed(train, dyn, lam, repeats=args.repeats)

    def objective(w, lam):
        return jnp.mean(val_losses(w, lam))

    rows = {}  # method: (mean-loss scores, per-example rows or None, seconds (mean), seconds (rows), bytes)
    ours = hg.Reverse(second_order=args.second_order)
    mean_scores = hg.attribute(dyn, objective, lam, method=ours)
    seconds = [hg.attribute(dyn, objective, lam, method=ours).stats["seconds"] for _ in range(args.repeats)]
    per_val = None if args.mean_only else hg.attribute(dyn, val_losses, lam, method=ours, chunk_size=args.chunk)
    label = "metagradient" if args.second_order == "reverse" else "metagradient (forward-over-reverse)"
    rows[label] = (mean_scores.scores, None if per_val is None else per_val.scores,
                   float(np.median(seconds)), None if per_val is None else per_val.stats["seconds"],
                   mean_scores.stats["temp_bytes"])

    # The training examples are arguments, not constants: XLA would spend minutes folding a
    # convolution's patches of constant images.
    def influence_program(d, l, w, xy):
        return influence(d, l, val_losses, example_loss, xy, w, rows=not args.mean_only)

    (if_rows, if_mean), if_seconds, if_bytes = timed(influence_program, dyn, lam, w_T, xy, repeats=args.repeats)
    rows["influence"] = (if_mean, if_rows, if_seconds, if_seconds, if_bytes)
    (tr_rows, tr_mean), tr_seconds, tr_bytes = timed(
        lambda d, l, xy: tracin(d, l, val_losses, example_loss, xy, setting.lr, args.every), dyn, lam, xy,
        repeats=args.repeats)
    rows["tracin"] = (tr_mean, None if args.mean_only else tr_rows, tr_seconds, tr_seconds, tr_bytes)

    peer_out = "not measured: the peer does not build the CNN" if peer is None else bergson(
        peer, args.bergson_python, args.bergson_per_query and not args.mean_only, args.bergson_repeats,
        args.bergson_threads)
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

    check = {}
    if args.derivative_check:
        pairs = derivative_check(dyn, lam, val_losses, mean_scores.scores)
        check = {"derivative_check": pairs.tolist(),
                 "score_over_difference": float(np.median(pairs[:, 0] / pairs[:, 1]))}
        print(f"{name}, {setting.label()}: the 10 largest scores ÷ their central differences (±0.05): median "
              f"{check['score_over_difference']:.3f}, max |score| {np.abs(pairs[:, 0]).max():.3g}", flush=True)
    loo = None
    if args.leave_one_out:
        start = time.perf_counter()
        loo = leave_one_out(dyn, lam, val_losses, float(mean_scores.value), n)
        loo_seconds = time.perf_counter() - start
    records = []
    common = {**check, "problem": name, "setting": setting.label(), **dataclasses.asdict(setting), "n_train": n,
              "n_val": args.n_val, "subsets": args.subsets, "train_seconds": train_seconds,
              "train_temp_mb": train_bytes / 2**20, "val_loss": float(mean_scores.value),
              "second_order": args.second_order,
              "val_error": float(val_error(w_T))}
    for keep in map(float, args.keep.split(",")):
        masks = subsets(n, args.subsets, keep, args.seed)
        start = time.perf_counter()
        actual = outcomes(dyn, lam, val_losses, masks)
        population_seconds = time.perf_counter() - start
        for method, (mean, per, s_mean, s_rows, nbytes, *extra) in rows.items():
            lds_rows = None if per is None else float(np.mean(
                [spearman(actual[:, j], masks @ np.asarray(per)[j]) for j in range(len(per))]))
            records.append({**common, "keep": keep, "method": method,
                            "lds_mean_loss": spearman(actual.mean(1), masks @ np.asarray(mean)),
                            "lds_per_example": lds_rows, "x_train_mean": s_mean / train_seconds,
                            "x_train_rows": None if s_rows is None else s_rows / train_seconds,
                            "temp_mb": None if nbytes is None else nbytes / 2**20,
                            "population_seconds": population_seconds, **(extra[0] if extra else {})})
        if loo is not None:
            records.append({**common, "keep": keep, "method": f"leave-one-out sum ({n} retrainings)",
                            "lds_mean_loss": spearman(actual.mean(1), masks @ loo), "lds_per_example": None,
                            "x_train_mean": loo_seconds / train_seconds, "x_train_rows": None, "temp_mb": None})
        if args.diagnose:
            records += diagnose(dyn, lam, objective, val_losses, masks, actual, keep, train_seconds, common, args)
    if isinstance(peer_out, str):
        records.append({"problem": name, "keep": "", "method": "bergson", "note": peer_out})
    return records


def diagnose(dyn, lam, objective, val_losses, masks, actual, keep, train_seconds, common, args) -> list[dict]:
    """Why the LDS is what it is, on the mean validation loss: the LDS of the best linear
    datamodel fitted on ``args.diagnose`` further retrainings (about the most any linear score can
    reach, estimated from below), and of the metagradient taken at u = keep (the subsets' mean
    weight) instead of u = 1."""
    n = masks.shape[1]
    fit_masks = subsets(n, args.diagnose, keep, args.seed + 1)
    start = time.perf_counter()
    fit_outcome = outcomes(dyn, lam, val_losses, fit_masks).mean(1)
    fit_seconds = time.perf_counter() - start
    coef = datamodel_fit(fit_masks, fit_outcome)
    centred = hg.attribute(dyn, objective, lam, weights=jnp.full(n, keep))
    out = []
    for method, scores, seconds in ((f"best linear fit ({args.diagnose} retrainings)", coef, fit_seconds),
                                    (f"metagradient at u = {keep:g}", centred.scores, centred.stats["seconds"])):
        out.append({**common, "keep": keep, "method": method,
                    "lds_mean_loss": spearman(actual.mean(1), masks @ np.asarray(scores)),
                    "lds_per_example": None, "x_train_mean": seconds / train_seconds, "x_train_rows": None,
                    "temp_mb": None})
    return out


def table(records: list[dict]) -> str:
    lines = ["| problem | setting | val error | kept | method | LDS, mean val loss | LDS, per val example "
             "| time ÷ one run (mean loss) | time ÷ one run (all rows) | temp memory (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "note" in r:
            lines.append(f"| {r['problem']} | | | | {r['method']} | {r['note']} | | | | |")
            continue

        def cell(key, fmt):
            return "—" if r.get(key) is None else format(r[key], fmt)

        memory = cell("temp_mb", ".2f") if "peak_rss_growth_mb" not in r else f"RSS +{r['peak_rss_growth_mb']:.1f}"
        lines.append(f"| {r['problem']} | {r.get('setting', '')} | {cell('val_error', '.1%')} | {r['keep']:.0%} "
                     f"| {r['method']} | {cell('lds_mean_loss', '.3f')} | {cell('lds_per_example', '.3f')} "
                     f"| {cell('x_train_mean', '.1f')} | {cell('x_train_rows', '.1f')} | {memory} |")
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


def settings(base: Setting, sweeps: list[str]) -> list[Setting]:
    """``base``, then ``base`` with one field changed at a time: each sweep is ``field=v1,v2,...``."""
    fields = {f.name: f.type for f in dataclasses.fields(Setting)}
    out = [base]
    for sweep in sweeps:
        field, _, values = sweep.partition("=")
        if field not in fields or not values:
            raise ValueError(f"a sweep is FIELD=V1,V2,... with FIELD one of {', '.join(fields)}; got {sweep!r}")
        cast = {"float": float, "int": int}.get(fields[field], str)
        for value in values.split(","):
            setting = dataclasses.replace(base, **{field: cast(value)})
            if setting not in out:
                out.append(setting)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default="logistic-digits,mlp-digits", help=f"comma-separated, of {PROBLEMS}")
    parser.add_argument("--subsets", type=int, default=100, help="M random subsets of the training set")
    parser.add_argument("--keep", default="0.5,0.9", help="comma-separated fractions of the examples a subset keeps")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--lr", type=float, help="learning rate (default: the problem's)")
    parser.add_argument("--batch", type=int, help="batch size (default 100; n: full batch)")
    parser.add_argument("--steps", type=int, help="training steps (default: the problem's)")
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), help="the MLP's hidden units (default silu)")
    parser.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2",
                        help="also run with FIELD (lr, batch, steps, activation) at each value, one field at a time; "
                             "repeatable")
    parser.add_argument("--mean-only", action="store_true",
                        help="only the mean validation loss's scores (skips the per-example rows)")
    parser.add_argument("--diagnose", type=int, default=0, metavar="K",
                        help="also the best linear datamodel fitted on K more retrainings, and our scores at u = keep")
    parser.add_argument("--leave-one-out", action="store_true",
                        help="also the additive model of the n exact leave-one-out changes (n retrainings)")
    parser.add_argument("--derivative-check", action="store_true",
                        help="also the 10 largest scores against central differences of the run in their weights")
    parser.add_argument("--chunk", type=int, default=50, help="validation rows per backward batch (ours)")
    parser.add_argument("--every", type=int, default=20, help="TracIn: steps between checkpoints")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--second-order", choices=("reverse", "forward"), default="reverse",
                        help="ours: hg.Reverse(second_order=...), the Hessian-vector part of each backward step "
                             "reverse-over-reverse or forward-over-reverse (same scores)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the run's initial weights and batch order, and the random subsets")
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
    overrides = {k: getattr(args, k) for k in ("lr", "batch", "steps", "activation") if getattr(args, k) is not None}
    records = []
    for name in args.problems.split(","):
        if name not in PROBLEMS:
            parser.error(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}")
        try:
            runs = settings(dataclasses.replace(DEFAULTS[name], **overrides), args.sweep)
        except ValueError as e:
            parser.error(str(e))
        for setting in runs:
            records += measure(name, setting, args)
            print(table(records), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
