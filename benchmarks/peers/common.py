"""Benchmark problem B1 as plain numpy data, and the measuring protocol every implementation shares.

``benchmarks/b1.py`` builds B1 (the spec is in its docstring) and writes its data, initial weights
and λ to one .npz with :func:`save_problem`; every implementation reads that file with
:func:`load_problem`, so all start from the same point. The arrays:

- ``x_train``, ``x_val``: images (N, 784) in [0, 1]; ``y_train``, ``y_val``: int64 labels;
- ``weights``: a list of four ``(W, b)`` pairs, ``W`` of shape (fan_in, fan_out);
- minibatch t (t = 0..T-1) is train[(t * B) mod N : +B] (:func:`batch_rows`);
- hyperparameters ``log_l2`` (L,), ``lr`` (T, L), ``momentum`` (T, L), per step and per layer;
- optimizer, per layer l, on both W_l and b_l, with v_0 = 0:
      v_t = mu[t, l] * v_{t-1} + (1 - mu[t, l]) * g_t
      w_t = w_{t-1} - lr[t, l] * v_t
- training loss: mean cross-entropy + sum_l exp(log_l2[l]) * ||W_l||^2 (weights only);
  objective: mean validation cross-entropy at w_T.

Peer interface (each module in this package):

    train(problem) -> list of (W, b) numpy pairs
    hypergrad(problem) -> (value: float, grads: dict[str, np.ndarray])

``grads`` has the keys ``log_l2``, ``lr``, ``momentum`` with the shapes of
the hyperparameters. Peers compute in ``problem.dtype`` (float32 by
default; float64 to check agreement).

This module imports numpy only.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np

HPARAM_KEYS = ("log_l2", "lr", "momentum")


@dataclasses.dataclass
class B1Problem:
    """Everything a peer needs, as numpy arrays in one dtype.

    ``weights`` is a list of ``(W, b)`` pairs, ``W`` of shape (fan_in, fan_out).
    Labels are int64. The arrays are stored already cast to ``dtype`` so that
    peers can wrap them without copying.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    weights: list
    log_l2: np.ndarray
    lr: np.ndarray
    momentum: np.ndarray
    T: int
    batch_size: int = 200
    dtype: str = "float32"

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    def hparams(self) -> dict:
        return {"log_l2": self.log_l2, "lr": self.lr, "momentum": self.momentum}

    def replace(self, **changes) -> "B1Problem":
        """A copy with some fields replaced (arrays are re-cast to the dtype)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "T"}
        return make_b1(**(fields | changes))


def make_b1(x_train, y_train, x_val, y_val, weights, log_l2, lr, momentum,
            batch_size: int = 200, dtype: str = "float32") -> B1Problem:
    """A checked :class:`B1Problem` from arrays, every float array cast to ``dtype``.

    Args:
      x_train, y_train, x_val, y_val: images (N, 784) scaled to [0, 1] and
        integer labels.
      weights: list of (W, b) pairs.
      log_l2: (n_layers,); lr, momentum: (T, n_layers).
      batch_size: minibatch size.
      dtype: "float32" or "float64".
    """
    dt = np.dtype(dtype)

    def f(a):
        return np.ascontiguousarray(np.asarray(a), dtype=dt)

    def labels(a):
        return np.ascontiguousarray(np.asarray(a), dtype=np.int64)

    prob = B1Problem(
        x_train=f(x_train),
        y_train=labels(y_train),
        x_val=f(x_val),
        y_val=labels(y_val),
        weights=[(f(W), f(b)) for W, b in weights],
        log_l2=f(log_l2),
        lr=f(lr),
        momentum=f(momentum),
        T=int(np.shape(lr)[0]),
        batch_size=int(batch_size),
        dtype=dt.name,
    )
    _check(prob)
    return prob


def _check(p: B1Problem) -> None:
    L = p.n_layers
    if p.log_l2.shape != (L,):
        raise ValueError(f"log_l2 has shape {p.log_l2.shape}, expected ({L},)")
    for name in ("lr", "momentum"):
        if getattr(p, name).shape != (p.T, L):
            raise ValueError(
                f"{name} has shape {getattr(p, name).shape}, expected ({p.T}, {L})"
            )
    if p.x_train.shape[0] != p.y_train.shape[0] or p.x_val.shape[0] != p.y_val.shape[0]:
        raise ValueError("images and labels differ in length")
    if p.batch_size > p.x_train.shape[0]:
        raise ValueError("batch_size exceeds the number of training rows")


def batch_rows(t: int, batch_size: int, n: int):
    """Rows of minibatch t: a slice when it fits, else indices modulo n."""
    start = (t * batch_size) % n
    if start + batch_size <= n:
        return slice(start, start + batch_size)
    return (start + np.arange(batch_size)) % n


# ---------------------------------------------------------------- files


def save_problem(path, problem: B1Problem) -> None:
    """Write a problem to an .npz (W0..W{L-1}, b0.., the data, the hyperparameters, batch_size)."""
    arrays = {
        "x_train": problem.x_train,
        "y_train": problem.y_train,
        "x_val": problem.x_val,
        "y_val": problem.y_val,
        "log_l2": problem.log_l2,
        "lr": problem.lr,
        "momentum": problem.momentum,
        "batch_size": np.int64(problem.batch_size),
    }
    for l, (W, b) in enumerate(problem.weights):
        arrays[f"W{l}"] = W
        arrays[f"b{l}"] = b
    np.savez(path, **arrays)


def load_problem(path, dtype=None) -> B1Problem:
    """Read an .npz written by ``save_problem``; ``dtype`` defaults to the file's."""
    with np.load(path) as z:
        n_layers = sum(1 for k in z.files if k.startswith("W"))
        weights = [(z[f"W{l}"], z[f"b{l}"]) for l in range(n_layers)]
        return make_b1(
            z["x_train"],
            z["y_train"],
            z["x_val"],
            z["y_val"],
            weights=weights,
            log_l2=z["log_l2"],
            lr=z["lr"],
            momentum=z["momentum"],
            batch_size=int(z["batch_size"]),
            dtype=dtype or z["x_train"].dtype.name,
        )


# ---------------------------------------------------------------- reference


def forward(weights, x):
    """MLP logits in numpy."""
    h = x
    for l, (W, b) in enumerate(weights):
        h = h @ W + b
        if l < len(weights) - 1:
            h = np.tanh(h)
    return h


def cross_entropy(logits, y) -> float:
    """Mean cross-entropy, computed stably."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def validation_loss(problem: B1Problem, weights) -> float:
    """The objective at given weights, in float64 numpy."""
    w64 = [(np.float64(W), np.float64(b)) for W, b in weights]
    return cross_entropy(forward(w64, problem.x_val.astype(np.float64)), problem.y_val)


# ---------------------------------------------------------------- timing


def rss_mb() -> dict:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, MB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) / 1024.0
    return {"rss": out.get("VmRSS", float("nan")), "hwm": out.get("VmHWM", float("nan"))}


def release_free_memory() -> None:
    """Give the pages malloc holds free back to the system (glibc ``malloc_trim(0)``).

    Without it, a cold call can reuse heap pages freed by the warm-up (or, for
    ours, by compilation) without raising the resident memory, and the peak
    above the baseline undercounts by a varying amount. Memory larger than
    malloc's mmap threshold is returned on free anyway; this covers the rest.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure(train, hypergrad, repeats: int = 5, with_train: bool = True,
            prepare=None) -> dict:
    """The measuring protocol shared by every implementation (ours and the peers).

    1. ``train()`` once (warm-up: JIT compilation, lazy imports, allocator),
       then ``prepare()`` if given (ours: compile the hypergradient program
       without running it, so compilation stays out of the memory figure).
    2. A training run measured the same way (``train_peak_rss_mb``, and
       ``train_peak_rss_delta_mb`` above the memory just before), then the
       *cold* hypergradient: resident memory (VmRSS) is read, the peak
       (VmHWM) reset, ``hypergrad()`` called once. ``peak_rss_delta_mb`` is the
       peak less the resident memory just before: what this call needed on top
       of the data, the libraries and compiled code. A cold call is the fair
       one: a later call may reuse pages an earlier call left mapped.
    3. ``repeats`` timed rounds, each ``train()`` then ``hypergrad()``, so
       load from other processes falls on both alike; wall (perf_counter)
       and process CPU seconds (all threads) per call.

    Args:
      train: ``() -> anything``, the plain training run (returns when done).
      hypergrad: ``() -> (value, {key: np.ndarray})``.
      repeats: timed rounds after the cold call (0: the cold call only, and
        its time is then the one reported).
      with_train: time ``train`` in the rounds (False: hypergradient only,
        the sweeps; the warm-up call is still made).
      prepare: optional ``() -> None`` run after the warm-up.

    Returns:
      medians ``train_s``, ``hypergrad_s``, ``train_cpu_s``,
      ``hypergrad_cpu_s``, the minima, ``ratio`` (hypergrad_s / train_s),
      the per-call samples, ``cold_hypergrad_s``, ``peak_rss_mb``,
      ``peak_rss_delta_mb``, ``baseline_rss_mb``, ``value`` and ``grads``.
    """
    import gc

    t0, c0 = time.perf_counter(), time.process_time()
    train()
    warm = {"warmup_train_s": time.perf_counter() - t0, "warmup_train_cpu_s": time.process_time() - c0}
    if prepare is not None:
        t0 = time.perf_counter()
        prepare()
        warm["prepare_s"] = time.perf_counter() - t0
    gc.collect()
    release_free_memory()
    train_baseline = rss_mb()["rss"]
    reset_peak_rss()
    train()
    train_peak = rss_mb()["hwm"]
    gc.collect()
    release_free_memory()
    baseline = rss_mb()["rss"]
    peak_reset = reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    value, grads = hypergrad()
    cold_s, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = rss_mb()["hwm"]
    gc.collect()

    wall = {"train": [], "hypergrad": []}
    cpu = {"train": [], "hypergrad": []}
    keys = ("train", "hypergrad") if with_train else ("hypergrad",)
    for _ in range(repeats):
        for key in keys:
            fn = train if key == "train" else hypergrad
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
            if key == "hypergrad":
                value, grads = out
            del out
    if not wall["hypergrad"]:
        wall["hypergrad"], cpu["hypergrad"] = [cold_s], [cold_cpu]
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    tr, hy = med(wall["train"]), med(wall["hypergrad"])
    return {
        "train_s": tr,
        "hypergrad_s": hy,
        "ratio": hy / tr if wall["train"] else float("nan"),
        "train_cpu_s": med(cpu["train"]),
        "hypergrad_cpu_s": med(cpu["hypergrad"]),
        "train_min_s": min(wall["train"], default=float("nan")),
        "hypergrad_min_s": min(wall["hypergrad"]),
        "cold_hypergrad_s": cold_s,
        "cold_hypergrad_cpu_s": cold_cpu,
        "peak_rss_mb": peak,
        "peak_rss_delta_mb": peak - baseline if peak_reset else None,
        "baseline_rss_mb": baseline,
        "train_peak_rss_mb": train_peak,
        "train_peak_rss_delta_mb": train_peak - train_baseline if peak_reset else None,
        "train_samples": wall["train"],
        "hypergrad_samples": wall["hypergrad"],
        "train_cpu_samples": cpu["train"],
        "hypergrad_cpu_samples": cpu["hypergrad"],
        **warm,
        "value": value,
        "grads": grads,
    }


def relative_difference(a: dict, b: dict) -> dict:
    """Per key: max |a - b| / max |b| (relative to the reference b's scale)."""
    out = {}
    for k in HPARAM_KEYS:
        scale = np.max(np.abs(b[k]))
        out[k] = float(np.max(np.abs(np.asarray(a[k]) - b[k])) / scale) if scale else float(
            np.max(np.abs(a[k]))
        )
    return out
