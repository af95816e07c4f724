"""EleutherAI's Bergson (MAGIC, PyTorch) on an attribution problem written by ``benchmarks.attribution``.

Runs in Bergson's own virtual environment (``pip install torch==2.13.0 bergson``; it needs torch,
torchopt and bergson, not hypergradient or JAX) from the repository root:

    PEER_PYTHON -m benchmarks.peers.bergson_magic --problem problem.npz --out bergson.npz

The problem file holds the training and validation arrays, the initial weights (``W0, b0, ...``),
the training examples of every step (``batches``, steps × batch size) and the hyperparameters,
so both sides train the same network on the same batches from the same start. Bergson is used as
its tests and ``run_magic`` use it, at its defaults: ``Trainer.initialize(model, torchopt.sgd)``,
``trainer.train(..., inplace=True, save_dir=...)`` (checkpoints every √T steps, written with
torch.distributed.checkpoint), the query gradient at the final state, then
``trainer.backward(..., inplace=True)``; the scores are ``weight_grads``, d(query loss)/d(weight of
each training example). Per-query scores (``--per-query``) follow its per-query mode: one backward
per validation example over the same forward checkpoints.

The model is a raw-loss ``nn.Module`` (Bergson's Trainer takes a module whose forward returns the
loss): ``mean(example_weight · cross-entropy) + l2/2 · Σ‖W‖²``, the same loss as ours; heavy-ball
momentum (v ← μv + g, w ← w − ηv) is ``torchopt.sgd(lr, momentum)``. Writes the scores, the seconds
of each part (median of ``--repeats``), the seconds of Bergson's training without checkpoints and
of a plain PyTorch training loop, and the growth of peak resident memory over the first scoring
call. Torch runs at its defaults unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchopt
from torch import nn
from torchopt.pytree import tree_iter

from bergson.distributed import grad_tree
from bergson.magic import BackwardState, Trainer


class Net(nn.Module):
    """Softmax regression or an MLP whose forward returns the weighted training loss."""

    def __init__(self, weights: list, activation: str, l2: float):
        super().__init__()
        self.depth = len(weights)
        for i, (W, b) in enumerate(weights):
            self.register_parameter(f"W{i}", nn.Parameter(torch.from_numpy(W.copy())))
            self.register_parameter(f"b{i}", nn.Parameter(torch.from_numpy(b.copy())))
        self.activation = F.silu if activation == "silu" else torch.tanh
        self.l2 = l2

    def logits(self, x):
        for i in range(self.depth):
            x = x @ getattr(self, f"W{i}") + getattr(self, f"b{i}")
            if i < self.depth - 1:
                x = self.activation(x)
        return x

    def forward(self, input_ids, targets, example_weight=None):
        ce = F.cross_entropy(self.logits(input_ids), targets, reduction="none")
        loss = ce.mean() if example_weight is None else (example_weight * ce).mean()
        return loss + 0.5 * self.l2 * sum((getattr(self, f"W{i}") ** 2).sum() for i in range(self.depth))


class ArrayStream:
    """Bergson's ``DataStream`` interface over arrays: batch ``i`` is the rows ``batches[i]``, with
    their entries of the per-example ``weights`` (one per training example, a leaf that the
    backward pass differentiates). ``input_ids`` is the key Bergson's Trainer reads a batch by."""

    def __init__(self, x, y, batches):
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.batches = torch.from_numpy(batches)
        self.device = torch.device("cpu")
        self.weights = nn.Parameter(torch.ones(len(x)))

    @property
    def requires_grad(self) -> bool:
        return self.weights.requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool):
        self.weights.requires_grad = value

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        rows = self.batches[i]
        return {"input_ids": self.x[rows], "targets": self.y[rows], "example_weight": self.weights[rows]}


def load(path: str) -> dict:
    with np.load(path) as f:
        p = {k: f[k] for k in f.files}
    p["weights"] = [(p[f"W{i}"], p[f"b{i}"]) for i in range(int(p["depth"]))]
    p["y"], p["yv"], p["batches"] = (p[k].astype(np.int64) for k in ("y", "yv", "batches"))
    return p


def setup(p: dict):
    model = Net(p["weights"], str(p["activation"]), float(p["l2"]))
    model.requires_grad_(True)
    trainer, state = Trainer.initialize(model, torchopt.sgd(float(p["lr"]), momentum=float(p["momentum"])))
    return model, trainer, state, ArrayStream(p["x"], p["y"], p["batches"])


def query_grads(model, state, xv, yv):
    """Gradient of the mean validation loss (rows ``xv``) at the state, as Bergson's tests take it."""
    with state.activate(model) as params:
        ce = F.cross_entropy(model.logits(xv), yv)
        return {k: g.detach().clone() for k, g in grad_tree(ce, params).items()}


def zero_opt_grads(state):
    return [torch.zeros_like(t) for t in tree_iter(state.opt_state)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def scores(p: dict, per_query: bool) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """MAGIC scores of the mean validation loss ``(n,)`` and, with ``per_query``, one row per
    validation example ``(n_val, n)``; and the seconds of train, query gradient and backward."""
    model, trainer, state, stream = setup(p)
    xv, yv = torch.from_numpy(p["xv"]), torch.from_numpy(p["yv"])
    seconds = {}
    with tempfile.TemporaryDirectory() as ckpt_dir:
        start = time.perf_counter()
        state = trainer.train(state, stream, inplace=True, save_dir=ckpt_dir)
        seconds["train_with_checkpoints"] = time.perf_counter() - start
        final = state.to("cpu").detach_()

        def backward(grads, cleanup):
            state.detach_()
            state.copy_(final)
            stream.requires_grad = True
            stream.weights.grad = None
            bwd = BackwardState(grads, zero_opt_grads(state), torch.zeros_like(stream.weights))
            bwd = trainer.backward(ckpt_dir, stream, bwd, state, inplace=True, cleanup=cleanup)
            return bwd.weight_grads.detach().numpy().copy()

        start = time.perf_counter()
        grads = query_grads(model, state, xv, yv)
        seconds["query_grad"] = time.perf_counter() - start
        start = time.perf_counter()
        mean = backward(grads, cleanup=not per_query)
        seconds["backward"] = time.perf_counter() - start
        rows = None
        if per_query:
            start = time.perf_counter()
            rows = np.stack([backward(query_grads(model, final, xv[j:j + 1], yv[j:j + 1]), cleanup=False)
                             for j in range(len(xv))])
            seconds["per_query"] = time.perf_counter() - start
    seconds["mean_total"] = seconds["train_with_checkpoints"] + seconds["query_grad"] + seconds["backward"]
    return mean, rows, seconds


def plain_train_seconds(p: dict) -> float:
    """Seconds of Bergson's own training run with no checkpoints: its cost of one run."""
    _, trainer, state, stream = setup(p)
    start = time.perf_counter()
    trainer.train(state, stream, inplace=True)
    return time.perf_counter() - start


def torch_train_seconds(p: dict) -> float:
    """Seconds of the same run as a plain PyTorch loop (``torch.optim.SGD``, same heavy ball): what
    training costs in PyTorch on this machine without Bergson's machinery."""
    model = Net(p["weights"], str(p["activation"]), float(p["l2"]))
    opt = torch.optim.SGD(model.parameters(), lr=float(p["lr"]), momentum=float(p["momentum"]))
    x, y, batches = torch.from_numpy(p["x"]), torch.from_numpy(p["y"]), torch.from_numpy(p["batches"])
    start = time.perf_counter()
    for rows in batches:
        opt.zero_grad()
        model(x[rows], y[rows]).backward()
        opt.step()
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", required=True, help=".npz written by benchmarks.attribution")
    ap.add_argument("--out", required=True, help="write the scores and timings to this .npz")
    ap.add_argument("--per-query", action="store_true", help="also one row of scores per validation example")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    p = load(args.problem)
    plain_train_seconds(p)  # warm-up: first-call costs of torch and torchopt
    rss_before = peak_rss_mb()
    mean, rows, first = scores(p, args.per_query)
    rss_growth = peak_rss_mb() - rss_before
    runs = [first] + [scores(p, False)[2] for _ in range(args.repeats - 1)]
    train = [plain_train_seconds(p) for _ in range(args.repeats)]
    torch_train = [torch_train_seconds(p) for _ in range(args.repeats)]
    out = {"mean": mean, "train_seconds": np.median(train), "torch_train_seconds": np.median(torch_train),
           "peak_rss_growth_mb": rss_growth,
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    for key in ("train_with_checkpoints", "query_grad", "backward", "mean_total"):
        out[f"{key}_seconds"] = np.median([r[key] for r in runs])
    if rows is not None:
        out["rows"] = rows
        out["per_query_seconds"] = first["per_query"]
    import bergson

    out["bergson"] = bergson.__version__
    np.savez(args.out, **out)


if __name__ == "__main__":
    main()
