"""B1 side by side: our methods and the PyTorch peers, alternately, in one run.

    python -m benchmarks.bench                 # the full run: 3 rounds x 3 timed calls
    python -m benchmarks.bench --quick         # 1 round, fewer calls, no float64 check

What it does:

1. Builds the B1 problem once (``benchmarks.b1 --write``: Fashion-MNIST
   train[0:10000] / [10000:20000], or digits with a message; its initial
   weights and λ) and writes it to one .npz that every implementation reads,
   so that data, w_0 and λ are identical.
2. Runs each implementation (ours: ``benchmarks.run_ours`` per method of
   ``b1.METHODS``; the peers: ``benchmarks.peers.run_peer``) in a process of its own
   (``python -m``, in the repository root),
   for ``--rounds`` rounds, the order rotated every round (A B C ... then
   B C ... A), so that the load from other users of the machine falls on
   every implementation alike. Each
   process: a warm-up, a cold hypergradient (its peak resident memory above
   the memory just before: what the hypergradient needs), then
   ``--repeats`` alternating timed calls of training and hypergradient
   (wall and CPU seconds).
3. Aggregates: medians over all timed calls of all rounds; the ratio
   hypergradient / training within each implementation; our Reverse
   against the fastest peer, per round and over the run; the relative
   difference of every hypergradient from our Reverse (max |g - g_ref| /
   max |g_ref| per hyperparameter, the largest reported); and, unless
   ``--no-x64``, the same agreement in float64 on a short run.
4. Writes ``benchmarks/results/b1.json`` (everything, with the load average
   at start and end) and ``benchmarks/results/b1.md`` (the table).

Settings. Every library runs at its own defaults (threads, OpenMP waiting,
no CPU pinning) unless a flag asks otherwise, and the report records which:
``--pin N`` runs every process on the first N CPUs (``taskset``; JAX's CPU
client then sizes its pool to N), ``--threads N`` gives PyTorch N intra-op
threads (``torch.set_num_threads``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``),
``--omp-passive`` sets ``OMP_WAIT_POLICY=PASSIVE`` for the peers (libgomp's
threads then sleep instead of spinning while they wait: kinder to a
loaded machine, slower for PyTorch on a quiet one). The same variables inherited from the
shell are dropped, so the processes run with what the report says.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.peers import PEERS, common

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PEER_LABEL = {"torch_plain": "PyTorch (autograd)", "torch_higher": "higher", "torch_torchopt": "TorchOpt"}
OUR_LABEL = {
    "reverse": "Reverse",
    "checkpoint": "Reverse(checkpoint_every={k})",
    "truncated": "Truncated({tk})",
    "forward": "Forward, 4 per-layer lrs (m = 4)",
    "reversible": "Reversible",
    "drmad": "DrMAD (approximate)",
}
APPROXIMATE = {"truncated": "biased by design", "drmad": "approximate by design"}


# ---------------------------------------------------------------- problem


def write_problem(path, T: int, dtype: str = "float32") -> dict:
    """Write B1 (``benchmarks.b1 --write``) to ``path`` in a child process; returns a summary of the problem.

    The runner itself never imports JAX: forking a process whose JAX thread
    pool is running can deadlock.
    """
    cmd = [*module("b1"), "--write", str(path), "--steps", str(T), "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(None), cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"writing the B1 problem failed:\n{proc.stderr}")
    sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- processes


def add_settings(ap: argparse.ArgumentParser) -> None:
    """The flags that move a library off its defaults (none by default)."""
    ap.add_argument("--pin", type=int, default=None, metavar="N",
                    help="run every process on the first N CPUs (taskset); default: not pinned")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="PyTorch intra-op threads (and OMP/MKL_NUM_THREADS); default: PyTorch's own")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for the peers; default: libgomp's own")


def settings(args) -> dict:
    """What the run set, for the report: None where a library ran at its default."""
    return {"pin_cpus": sorted(os.sched_getaffinity(0))[:args.pin] if args.pin else None,
            "torch_threads": args.threads,
            "omp_wait_policy": "PASSIVE" if args.omp_passive else None}


def child_env(threads: int | None) -> dict:
    """The environment of a measured process: the caller's, without the thread and wait-policy
    settings that only the flags may set (``--threads``; ``--omp-passive`` goes to ``run_peer``),
    so that the report's settings line says what the processes ran with."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def module(name: str) -> list[str]:
    """The command that runs ``benchmarks.NAME`` as a module (in a process whose cwd is ``ROOT``)."""
    return [sys.executable, "-m", f"benchmarks.{name}"]


def run_impl(impl: str, name: str, problem: str, run: dict, *, repeats: int, extra=(), save_grads=None,
             cache_dir=None, timeout: float = 900) -> dict:
    """Run one implementation in a fresh process with the settings ``run`` (see :func:`settings`);
    its JSON record, or {"error": ...}."""
    if impl == "ours":
        cmd = [*module("run_ours"), name]
        if cache_dir:
            cmd += ["--cache-dir", cache_dir]
    else:
        cmd = [*module("peers.run_peer"), name]
        if run["torch_threads"]:
            cmd += ["--threads", str(run["torch_threads"])]
        if run["omp_wait_policy"]:
            cmd += ["--omp-passive"]
    cmd += ["--problem", problem, "--repeats", str(repeats), "--json", *extra]
    if save_grads:
        cmd += ["--save-grads", save_grads]
    if run["pin_cpus"]:
        cmd = ["taskset", "-c", ",".join(map(str, run["pin_cpus"]))] + cmd
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(run["torch_threads"]),
                              timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "name": name, "error": f"timed out after {timeout:.0f} s"}
    elapsed = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = ((proc.stderr or proc.stdout).strip().splitlines() or [""])[-1]
        kind, sep, message = last.partition(": ")
        if sep and re.fullmatch(r"[\w.]+", kind):  # "package.module.SomeError: message": the class's own name
            last = f"{kind.rpartition('.')[2]}: {message}"
        return {"impl": impl, "name": name, "error": f"exit {proc.returncode}: {last}"}
    rec = json.loads(lines[-1])
    rec["process_seconds"] = elapsed
    return rec


def load_grads(path) -> tuple[float, dict]:
    with np.load(path) as z:
        return float(z["value"]), {k: z[k] for k in z.files if k != "value"}


def agreement(name: str, grads: dict, ref: dict) -> dict:
    """Relative difference from the reference (our Reverse): per key and the largest."""
    if "lr_layer" in grads:  # Forward on the per-layer lrs: d/d lr_l = Σ_t d/d lr[t, l]
        pairs = {"lr_layer": (grads["lr_layer"], ref["lr"].sum(axis=0))}
    else:
        pairs = {k: (grads[k], ref[k]) for k in common.HPARAM_KEYS}
    per = {}
    for k, (a, b) in pairs.items():
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        per[k] = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    return {"per_key": per, "max": max(per.values())}


def med(xs):
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------- main run


def our_methods() -> list[str]:
    """``b1.METHODS``, the methods measured on B1 (asked in a child: the runner does not import JAX)."""
    code = "import json; from benchmarks import b1; print(json.dumps(b1.METHODS))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=child_env(None))
    if proc.returncode != 0:
        raise SystemExit(f"cannot list our methods:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def jobs_for(args) -> list[tuple[str, str]]:
    if not hasattr(args, "_our_methods"):
        args._our_methods = our_methods()
    ours = [m for m in args._our_methods if args.methods is None or m in args.methods]
    peers = [p for p in PEERS if args.peers is None or p in args.peers]
    return [("ours", m) for m in ours] + [("peer", p) for p in peers]


def our_extra(name: str, args) -> list[str]:
    return {"checkpoint": ["--checkpoint-every", str(args.checkpoint_every)],
            "truncated": ["--truncate", str(args.truncate)]}.get(name, [])


def aggregate(records: list[dict]) -> dict:
    ok = [r for r in records if "error" not in r]
    if not ok:
        return {"error": records[-1]["error"] if records else "not run", "rounds": 0}
    cat = lambda key: [x for r in ok for x in r.get(key, [])]  # noqa: E731
    train, hyper = med(cat("train_samples")), med(cat("hypergrad_samples"))
    out = {
        "impl": ok[0]["impl"],
        "name": ok[0]["name"],
        "method": ok[0]["method"],
        "rounds": len(ok),
        "errors": [r["error"] for r in records if "error" in r],
        "train_s": train,
        "hypergrad_s": hyper,
        "ratio": hyper / train if train else None,
        "ratio_per_round": [r["ratio"] for r in ok],
        "train_cpu_s": med(cat("train_cpu_samples")),
        "hypergrad_cpu_s": med(cat("hypergrad_cpu_samples")),
        "train_min_s": min(cat("train_samples"), default=None),
        "hypergrad_min_s": min(cat("hypergrad_samples"), default=None),
        "peak_rss_delta_mb": med([r["peak_rss_delta_mb"] for r in ok]),
        "peak_rss_delta_mb_max": max(r["peak_rss_delta_mb"] or 0 for r in ok),
        "peak_rss_mb": med([r["peak_rss_mb"] for r in ok]),
        "baseline_rss_mb": med([r["baseline_rss_mb"] for r in ok]),
        "value": ok[-1]["value"],
        "load_avg_1min": [r["load_avg_1min_start"] for r in ok],
    }
    for k in ("xla_temp_mb", "compile_seconds", "method_stats", "m"):
        if k in ok[-1]:
            out[k] = ok[-1][k]
    return out


def per_round_speedup(records_by_round: list[dict], key: str) -> list[float]:
    """Per round: fastest peer's median hypergradient time / our Reverse's (same round)."""
    out = []
    for rnd in records_by_round:
        ours = rnd.get(("ours", "reverse"))
        peers = [r for (impl, _), r in rnd.items() if impl == "peer" and "error" not in r]
        if ours and "error" not in ours and peers:
            out.append(min(r[key] for r in peers) / ours[key])
    return out


def x64_check(args, tmp: Path) -> dict:
    """Float64 agreement on a short run: every implementation against our Reverse."""
    path = str(tmp / "b1_f64.npz")
    write_problem(path, args.x64_steps, dtype="float64")
    out = {"T": args.x64_steps, "dtype": "float64", "implementations": {}}
    # Truncated and DrMAD approximate by design: nothing to check at 1e-12.
    jobs = [("ours", "reverse")] + [j for j in jobs_for(args)
                                    if j != ("ours", "reverse") and j[1] not in APPROXIMATE]
    grads = {}
    for impl, name in jobs:
        g = str(tmp / f"f64_{name}.npz")
        rec = run_impl(impl, name, path, args.run, repeats=0, extra=our_extra(name, args) if impl == "ours" else [],
                       save_grads=g, cache_dir=args.cache_dir, timeout=600)
        if "error" in rec:
            out["implementations"][name] = {"error": rec["error"]}
            continue
        grads[name] = load_grads(g)
        print(f"  x64 {name}: value {grads[name][0]:.10f}", file=sys.stderr)
    ref_value, ref = grads.get("reverse", (None, None))
    for name, (value, g) in grads.items():
        if ref is None:
            break
        a = agreement(name, g, ref)
        out["implementations"][name] = {"value": value, "value_rel_diff": abs(value - ref_value) / abs(ref_value),
                                        "rel_diff": a["max"], "rel_diff_per_key": a["per_key"]}
    return out


def fmt(x, spec=".3f", none="—"):
    return none if x is None else format(x, spec)


def markdown(report: dict) -> str:
    p, s = report["problem"], report["summary"]
    lines = [
        "# B1 benchmark: ours and the PyTorch peers, side by side",
        "",
        f"{report['date']} · commit `{report['commit'][:10]}` · {report['machine']['cpu']} "
        f"({report['machine']['cpus']} CPUs) · {describe(report['settings'])} · "
        f"load average at start {report['load_avg_start'][0]:.2f} / {report['load_avg_start'][1]:.2f} / "
        f"{report['load_avg_start'][2]:.2f}, at end {report['load_avg_end'][0]:.2f} · "
        f"{report['rounds']} rounds x {report['repeats']} timed calls, order rotated per round",
        "",
        f"B1: {p['data']} {p['n_train']}/{p['n_val']}, MLP {'-'.join(map(str, p['layer_sizes']))}, "
        f"T = {p['T']}, batch {p['batch_size']}, {p['dtype']}; λ = log_l2 (4) = {p['log_l2']}, "
        f"lr (T, 4) = {p['lr']}, momentum (T, 4) = {p['momentum']}: {4 + 8 * p['T']} hyperparameters. "
        "Same data, initial weights and λ for every implementation (one .npz).",
        "",
        "| implementation | method | training (s) | hypergradient (s) | ratio | CPU s train / hypergrad "
        "| peak memory (MB) | rel. diff vs our Reverse (f32) | rel. diff (f64) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    x64 = report.get("x64_check", {}).get("implementations", {})
    for key, r in report["results"].items():
        impl, name = key.split(":", 1)
        label = "ours" if impl == "ours" else PEER_LABEL.get(name, name)
        if "error" in r:
            lines.append(f"| {label} | {name} | failed: {r['error'][:200]} | | | | | | |")
            continue
        method = (OUR_LABEL.get(name, name).format(k=report["checkpoint_every"], tk=report["truncate"])
                  if impl == "ours" else "unrolled reverse")
        mem = fmt(r["peak_rss_delta_mb"], ".0f")
        if r.get("xla_temp_mb") is not None and r.get("xla_temp_mb", -1) >= 0:
            mem += f" (XLA temp {r['xla_temp_mb']:.0f})"
        diff = r.get("rel_diff")
        diff_s = "reference" if key == "ours:reverse" else fmt(diff, ".1e")
        if name in APPROXIMATE and diff is not None:
            diff_s += f" ({APPROXIMATE[name]})"
        if name == "forward" and diff is not None:
            diff_s += " (vs Σ_t ∂/∂lr[t])"
        d64 = x64.get(name, {})
        d64_s = "reference" if key == "ours:reverse" and x64 else fmt(d64.get("rel_diff"), ".1e")
        lines.append(
            f"| {label} | {method} | {fmt(r['train_s'])} | {fmt(r['hypergrad_s'])} | {fmt(r['ratio'], '.2f')} "
            f"| {fmt(r['train_cpu_s'], '.2f')} / {fmt(r['hypergrad_cpu_s'], '.2f')} | {mem} | {diff_s} | {d64_s} |"
        )
    lines += [
        "",
        "Times are medians of all timed calls over all rounds (wall seconds; CPU = process CPU seconds, "
        "all threads). Ratio = hypergradient / training of the same implementation in the same process. "
        "Peak memory = the peak resident memory of a cold hypergradient call above the resident memory "
        "just before it (data, libraries and compiled code excluded), median over rounds; for ours, "
        "XLA's own temporary-buffer figure in brackets. Relative difference = max |g − g_ref| / max |g_ref| "
        "per hyperparameter (log_l2, lr, momentum), the largest of the three"
        + (f"; float64 on T = {report['x64_check']['T']}." if x64 else "."),
        "",
    ]
    if s.get("speedup_wall") is not None:
        lines += [
            "## Target: our Reverse hypergradient ≥ 2× faster than the fastest peer",
            "",
            f"Fastest peer: {PEER_LABEL.get(s['fastest_peer'], s['fastest_peer'])}. "
            f"Speed-up of our Reverse: **{s['speedup_wall']:.2f}× wall** "
            f"(per round: {', '.join(f'{x:.2f}' for x in s['speedup_wall_per_round'])}), "
            f"{s['speedup_cpu']:.2f}× CPU time. Target {'met' if s['speedup_wall'] >= 2 else 'missed'}"
            f" on wall time, {'met' if s['speedup_cpu'] >= 2 else 'missed'} on CPU time.",
            "",
        ]
    return "\n".join(lines)


def describe(run: dict) -> str:
    """The settings of a run in words, for the tables."""
    moved = [f"pinned to CPUs {','.join(map(str, run['pin_cpus']))}" if run["pin_cpus"] else "",
             f"PyTorch intra-op threads: {run['torch_threads']}" if run["torch_threads"] else "",
             f"OMP_WAIT_POLICY={run['omp_wait_policy']} for the peers" if run["omp_wait_policy"] else ""]
    return "; ".join(m for m in moved if m) or "every library at its defaults (no pinning, no OMP_WAIT_POLICY)"


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = int(fh.readline().split()[1]) / 2**20
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "mem_gib": mem, "python": platform.python_version()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=100, help="training steps (B1: 100)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--truncate", type=int, default=10)
    ap.add_argument("--methods", type=lambda s: s.split(","), default=None, help="ours, comma-separated")
    ap.add_argument("--peers", type=lambda s: s.split(","), default=None, help="comma-separated")
    ap.add_argument("--no-x64", action="store_true", help="skip the float64 agreement check")
    ap.add_argument("--x64-steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="1 round, 2 timed calls, no float64 check")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--cache-dir", default=None, help="JAX compilation cache (default: a temporary folder)")
    add_settings(ap)
    args = ap.parse_args(argv)
    args.run = settings(args)
    if args.quick:
        args.rounds, args.repeats, args.no_x64 = 1, 2, True

    report = {
        "benchmark": "B1",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
        "settings": args.run,
        "load_avg_start": list(os.getloadavg()),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "checkpoint_every": args.checkpoint_every,
        "truncate": args.truncate,
    }
    print(f"B1 bench: load average {report['load_avg_start']}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="hg-bench-") as tmpdir:
        tmp = Path(tmpdir)
        args.cache_dir = args.cache_dir or str(tmp / "jax-cache")
        problem = str(tmp / "b1.npz")
        report["problem"] = write_problem(problem, args.T)
        jobs = jobs_for(args)
        records = {job: [] for job in jobs}
        by_round = []
        for rnd in range(args.rounds):
            order = jobs[rnd % len(jobs):] + jobs[: rnd % len(jobs)]
            this = {}
            for impl, name in order:
                g = str(tmp / f"{impl}_{name}.npz")
                rec = run_impl(impl, name, problem, args.run, repeats=args.repeats,
                               extra=our_extra(name, args) if impl == "ours" else [],
                               save_grads=g if rnd == 0 else None, cache_dir=args.cache_dir)
                records[(impl, name)].append(rec)
                this[(impl, name)] = rec
                msg = rec.get("error") or (f"train {rec['train_s']:.3f}s hypergrad {rec['hypergrad_s']:.3f}s "
                                           f"(cpu {rec['hypergrad_cpu_s']:.2f}s) peak +{rec['peak_rss_delta_mb']:.0f} MB "
                                           f"load {rec['load_avg_1min_start']:.1f}")
                print(f"round {rnd + 1}/{args.rounds} {impl}:{name}: {msg}", file=sys.stderr)
            by_round.append(this)

        results = {f"{impl}:{name}": aggregate(recs) for (impl, name), recs in records.items()}
        ref_path = tmp / "ours_reverse.npz"
        if ref_path.exists():
            ref_value, ref = load_grads(ref_path)
            for (impl, name) in jobs:
                path = tmp / f"{impl}_{name}.npz"
                r = results[f"{impl}:{name}"]
                if path.exists() and "error" not in r:
                    value, g = load_grads(path)
                    a = agreement(name, g, ref)
                    r["rel_diff"], r["rel_diff_per_key"] = a["max"], a["per_key"]
                    r["value_rel_diff"] = abs(value - ref_value) / abs(ref_value)
        if not args.no_x64:
            print("float64 agreement check ...", file=sys.stderr)
            report["x64_check"] = x64_check(args, tmp)
    report["load_avg_end"] = list(os.getloadavg())
    report["results"] = results
    report["raw"] = {f"{impl}:{name}": recs for (impl, name), recs in records.items()}

    ours_rev = results.get("ours:reverse", {})
    peers = {k.split(":", 1)[1]: r for k, r in results.items() if k.startswith("peer:") and "error" not in r}
    summary = {}
    if peers and "error" not in ours_rev and ours_rev:
        fastest = min(peers, key=lambda n: peers[n]["hypergrad_s"])
        summary = {
            "fastest_peer": fastest,
            "speedup_wall": peers[fastest]["hypergrad_s"] / ours_rev["hypergrad_s"],
            "speedup_cpu": min(r["hypergrad_cpu_s"] for r in peers.values()) / ours_rev["hypergrad_cpu_s"],
            "speedup_wall_per_round": per_round_speedup(by_round, "hypergrad_s"),
            "speedup_cpu_per_round": per_round_speedup(by_round, "hypergrad_cpu_s"),
            "target_2x_wall_met": peers[fastest]["hypergrad_s"] / ours_rev["hypergrad_s"] >= 2,
        }
    report["summary"] = summary

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "b1.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / "b1.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
