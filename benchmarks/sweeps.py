"""Scaling sweeps: hypergradient time and peak memory against T and against m.

    python -m benchmarks.sweeps            # T in {100, 300, 1000, 3000}, m in {1, 4, 16, 64, 256}
    python -m benchmarks.sweeps --quick    # T in {100, 300}, m in {1, 16, 256}; *_quick files
    python -m benchmarks.sweeps --only T   # one of the two sweeps

Sweep over T (B1 with T steps, the same data, initial weights and λ shapes
(T, 4)): every method of ``b1.METHODS`` (Reverse, Reverse with checkpoints every
round(√T) steps, Truncated(10), Forward on the 4 per-layer learning rates,
Reversible and DrMAD) and the three PyTorch peers (which store
the trajectory). Each point is one process (``benchmarks.run_ours`` /
``benchmarks.peers.run_peer``, the protocol of ``common.measure``): a warm-up
training run, a cold hypergradient (its peak resident memory above the
memory just before it is the memory figure), then one timed call (the time
figure; the cold call's time when a call is predicted to exceed a minute).
A point predicted, from the same implementation at the previous T (time
and, for the methods that store the trajectory, memory linear in T), to need
more than ``--max-gib`` (16) of memory or ``--max-seconds`` (180) per call
is skipped and listed as such.

Sweep over m (T = 100): Forward and Reverse with the first m entries of the
flattened (T, 4) learning-rate schedule as the hyperparameters (``run_ours
--hparams first-m-lr``), m in {1, 4, 16, 64, 256}; Forward's cost grows with
m, Reverse's does not; the plot shows where they cross.

Every library runs at its own defaults unless ``--pin``, ``--threads`` or
``--omp-passive`` asks otherwise (as in ``bench.py``); the JSON records which.

Writes ``benchmarks/results/sweep_T.{json,png}``, ``sweep_m.{json,png}`` and
``sweeps.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.bench import (
    PEER_LABEL, RESULTS, add_settings, describe, git_commit, machine, our_methods, run_impl, settings, write_problem,
)
from benchmarks.peers import PEERS

STORES_TRAJECTORY = {"reverse"} | set(PEERS)
LABEL = {
    "reverse": "ours: Reverse",
    "checkpoint": "ours: Reverse + checkpoints (k = √T)",
    "truncated": "ours: Truncated(10)",
    "forward": "ours: Forward (m = 4 per-layer lrs)",
    "reversible": "ours: Reversible",
    "drmad": "ours: DrMAD",
    **{p: f"peer: {label}" for p, label in PEER_LABEL.items()},
}


def _short(rec: dict) -> dict:
    keep = ("impl", "name", "method", "T", "m", "hypergrad_s", "hypergrad_cpu_s", "cold_hypergrad_s",
            "peak_rss_delta_mb", "peak_rss_mb", "baseline_rss_mb", "train_peak_rss_mb", "train_peak_rss_delta_mb",
            "xla_temp_mb", "value", "repeats",
            "load_avg_1min_start", "process_seconds", "error", "method_stats")
    return {k: rec[k] for k in keep if k in rec}


def sweep_T(args, tmp: Path) -> dict:
    jobs = [("ours", m) for m in our_methods()] + [("peer", p) for p in PEERS]
    if args.methods:
        jobs = [j for j in jobs if j[1] in args.methods]
    points = {name: [] for _, name in jobs}
    skipped = []
    last = {}
    for i, T in enumerate(args.Ts):
        path = str(tmp / f"b1_T{T}.npz")
        write_problem(path, T)
        k = max(1, round(math.sqrt(T)))
        order = jobs[i % len(jobs):] + jobs[: i % len(jobs)]
        for impl, name in order:
            prev = last.get(name)
            repeats = 1
            if prev:
                scale = T / prev["T"]
                t_est = prev["hypergrad_s"] * scale
                mem_est = (prev["peak_rss_delta_mb"] or 0) * (scale if name in STORES_TRAJECTORY else 1)
                if t_est > args.max_seconds or mem_est > args.max_gib * 1024:
                    why = (f"predicted {t_est:.0f} s per call" if t_est > args.max_seconds
                           else f"predicted {mem_est / 1024:.1f} GiB")
                    skipped.append({"name": name, "T": T, "reason": why})
                    print(f"T={T} {name}: skipped ({why})", file=sys.stderr)
                    continue
                if t_est > 60:
                    repeats = 0  # the cold call's time stands for the point
            extra = {"checkpoint": ["--checkpoint-every", str(k)], "truncated": ["--truncate", "10"]}.get(name, [])
            if impl == "ours":
                extra = extra + ["--no-train"]
            else:
                extra = ["--no-train"]
            rec = run_impl(impl, name, path, args.run, repeats=repeats, extra=extra, cache_dir=args.cache_dir,
                           timeout=max(600, 6 * args.max_seconds))
            rec["T"] = T
            if name == "checkpoint":
                rec["checkpoint_every"] = k
            points[name].append(_short(rec) | ({"checkpoint_every": k} if name == "checkpoint" else {}))
            if "error" in rec:
                print(f"T={T} {name}: {rec['error']}", file=sys.stderr)
                continue
            last[name] = rec
            print(f"T={T} {name}: {rec['hypergrad_s']:.2f} s (cpu {rec['hypergrad_cpu_s']:.2f}), "
                  f"peak +{rec['peak_rss_delta_mb']:.0f} MB, load {rec['load_avg_1min_start']:.1f}",
                  file=sys.stderr)
    return {"Ts": args.Ts, "points": points, "skipped": skipped, "targets": memory_targets(points, args.Ts[-1])}


def memory_targets(points: dict, T: int) -> dict:
    """At T: peak memory of Reverse+checkpoints and Reversible against every peer's (ratio peer / ours)."""
    at = {name: p for name, pts in points.items() for p in pts if p.get("T") == T and "error" not in p}
    peers = {n: at[n]["peak_rss_delta_mb"] for n in PEERS if n in at}
    out = {"T": T, "peers_mb": peers}
    for ours, need in (("checkpoint", 1.0), ("reversible", 10.0)):
        if ours in at and peers:
            mine = max(at[ours]["peak_rss_delta_mb"], 1e-9)
            worst = min(peers.values()) / mine
            out[ours] = {"mb": at[ours]["peak_rss_delta_mb"], "xla_temp_mb": at[ours].get("xla_temp_mb"),
                         "lowest_peer_over_ours": worst, "needed": need, "met": worst >= need if need > 1 else worst > 1}
    if "reversible" in at and at["reversible"].get("train_peak_rss_mb"):
        r = at["reversible"]
        out["reversible_vs_training"] = {
            "peak_rss_mb": r["peak_rss_mb"], "train_peak_rss_mb": r["train_peak_rss_mb"],
            "ratio": r["peak_rss_mb"] / r["train_peak_rss_mb"],
            "delta_mb": r["peak_rss_delta_mb"], "train_delta_mb": r["train_peak_rss_delta_mb"],
            "needed": 1.5, "met": r["peak_rss_mb"] / r["train_peak_rss_mb"] <= 1.5,
        }
    return out


def sweep_m(args, tmp: Path) -> dict:
    path = str(tmp / "b1_T100.npz")
    if not Path(path).exists():
        write_problem(path, 100)
    points = {"forward": [], "reverse": []}
    for i, m in enumerate(args.ms):
        names = ["forward", "reverse"] if i % 2 == 0 else ["reverse", "forward"]
        for name in names:
            rec = run_impl("ours", name, path, args.run, repeats=args.m_repeats,
                           extra=["--hparams", "first-m-lr", "--m", str(m), "--no-train"],
                           cache_dir=args.cache_dir, timeout=900)
            rec["m"] = m
            points[name].append(_short(rec))
            msg = rec.get("error") or (f"{rec['hypergrad_s']:.2f} s (cpu {rec['hypergrad_cpu_s']:.2f}), "
                                       f"peak +{rec['peak_rss_delta_mb']:.0f} MB")
            print(f"m={m} {name}: {msg}", file=sys.stderr)
    crossing = None
    fw = {p["m"]: p for p in points["forward"] if "error" not in p}
    rv = {p["m"]: p for p in points["reverse"] if "error" not in p}
    ms = sorted(set(fw) & set(rv))
    for a, b in zip(ms, ms[1:]):
        da = fw[a]["hypergrad_s"] - rv[a]["hypergrad_s"]
        db = fw[b]["hypergrad_s"] - rv[b]["hypergrad_s"]
        if da <= 0 < db:  # log-linear interpolation of the sign change
            crossing = math.exp(math.log(a) + (math.log(b) - math.log(a)) * (-da) / (db - da))
            break
    if crossing is None and ms and fw[ms[0]]["hypergrad_s"] > rv[ms[0]]["hypergrad_s"]:
        crossing = f"< {ms[0]} (Forward slower at every m)"
    return {"T": 100, "ms": args.ms, "points": points, "forward_slower_from_m": crossing}


def plot_T(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, pts in res["points"].items():
        pts = [p for p in pts if "error" not in p]
        if not pts:
            continue
        style = "--" if name in PEERS else "-"
        Ts = [p["T"] for p in pts]
        axes[0].plot(Ts, [p["hypergrad_s"] for p in pts], style, marker="o", label=LABEL.get(name, name))
        axes[1].plot(Ts, [max(p["peak_rss_delta_mb"], 1.0) for p in pts], style, marker="o",
                     label=LABEL.get(name, name))
    for ax, title in zip(axes, ("hypergradient time (s, wall)", "peak memory of the hypergradient (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training steps T")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"B1 scaling with T ({res.get('date', '')}, load {res.get('load', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_m(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, label in (("forward", "Forward"), ("reverse", "Reverse")):
        pts = [p for p in res["points"][name] if "error" not in p]
        ms = [p["m"] for p in pts]
        axes[0].plot(ms, [p["hypergrad_s"] for p in pts], marker="o", label=label)
        axes[1].plot(ms, [max(p["peak_rss_delta_mb"], 1.0) for p in pts], marker="o", label=label)
    for ax, title in zip(axes, ("hypergradient time (s, wall)", "peak memory of the hypergradient (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("number of hyperparameters m (first m entries of the lr schedule)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"B1, T = 100: Forward vs Reverse as m grows ({res.get('date', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(T_res, m_res) -> str:
    lines = []
    if T_res:
        Ts = T_res["Ts"]
        lines += ["### Hypergradient time (s, wall) and peak memory (MB) against T",
                  "",
                  f"{T_res['date']} · load average at start {T_res['load']} · one process per point · "
                  f"{describe(T_res['settings'])}",
                  "",
                  "| implementation | " + " | ".join(f"T = {T}" for T in Ts) + " |",
                  "|---|" + "---:|" * len(Ts)]
        for name, pts in T_res["points"].items():
            by_T = {p["T"]: p for p in pts}
            skipped = {s["T"]: s["reason"] for s in T_res["skipped"] if s["name"] == name}
            cells = []
            for T in Ts:
                p = by_T.get(T)
                if p is None:
                    cells.append(f"skipped ({skipped[T]})" if T in skipped else "—")
                elif "error" in p:
                    cells.append("failed")
                else:
                    cells.append(f"{p['hypergrad_s']:.2f} s, {p['peak_rss_delta_mb']:.0f} MB")
            lines.append(f"| {LABEL.get(name, name)} | " + " | ".join(cells) + " |")
        lines.append("")
        for name, pts in T_res["points"].items():
            for p in pts:
                if "error" in p:
                    lines.append(f"- {LABEL.get(name, name)} failed at T = {p['T']}: "
                                 f"{p['error'].split('|')[-1].strip()[:200]}")
        lines.append("")
        tg = T_res.get("targets", {})
        if tg.get("peers_mb"):
            lines.append(f"Memory targets at T = {tg['T']} (peers: " + ", ".join(
                f"{PEER_LABEL[n]} {mb:.0f} MB" for n, mb in tg["peers_mb"].items()) + "):")
            lines.append("")
            for ours, text in (("checkpoint", "Reverse + checkpoints below every peer"),
                               ("reversible", "Reversible at least 10x below every peer")):
                if ours in tg:
                    t = tg[ours]
                    lines.append(f"- {text}: {t['mb']:.0f} MB, the lowest peer uses {t['lowest_peer_over_ours']:.1f}x "
                                 f"that: {'met' if t['met'] else 'missed'}.")
                else:
                    lines.append(f"- {text}: not measured at this T.")
        rt = tg.get("reversible_vs_training")
        if rt:
            lines.append(f"- Reversible within 1.5x of a plain training run (same process, peak resident memory): "
                         f"{rt['peak_rss_mb']:.0f} MB against {rt['train_peak_rss_mb']:.0f} MB, "
                         f"{rt['ratio']:.2f}x: {'met' if rt['met'] else 'missed'}. Above the memory resident "
                         f"before each call: {rt['delta_mb']:.0f} MB against {rt['train_delta_mb']:.0f} MB.")
        lines.append("")
    if m_res:
        lines += ["### Forward against Reverse as the number of hyperparameters m grows (T = 100)", "",
                  "| m | " + " | ".join(str(m) for m in m_res["ms"]) + " |",
                  "|---|" + "---:|" * len(m_res["ms"])]
        for name, label in (("forward", "Forward"), ("reverse", "Reverse")):
            by_m = {p["m"]: p for p in m_res["points"][name]}
            cells = [("failed" if "error" in by_m[m] else f"{by_m[m]['hypergrad_s']:.2f} s, "
                      f"{by_m[m]['peak_rss_delta_mb']:.0f} MB") if m in by_m else "—" for m in m_res["ms"]]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        c = m_res["forward_slower_from_m"]
        lines += ["", f"Forward becomes slower than Reverse from m ≈ "
                  f"{c if isinstance(c, str) or c is None else f'{c:.1f}'}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T in {100, 300}, m in {1, 16, 256}")
    ap.add_argument("--only", choices=("T", "m"), default=None)
    ap.add_argument("--methods", type=lambda s: s.split(","), default=None,
                    help="T sweep: only these (our method names and peer names)")
    ap.add_argument("--max-gib", type=float, default=16.0)
    ap.add_argument("--max-seconds", type=float, default=180.0)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--cache-dir", default=None)
    add_settings(ap)
    args = ap.parse_args(argv)
    args.run = settings(args)
    args.Ts = [100, 300] if args.quick else [100, 300, 1000, 3000]
    args.ms = [1, 16, 256] if args.quick else [1, 4, 16, 64, 256]
    args.m_repeats = 1 if args.quick else 2
    suffix = "_quick" if args.quick else ""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
            "machine": machine(), "settings": args.run, "load_avg_start": list(os.getloadavg())}
    T_res = m_res = None
    with tempfile.TemporaryDirectory(prefix="hg-sweeps-") as tmpdir:
        tmp = Path(tmpdir)
        args.cache_dir = args.cache_dir or str(tmp / "jax-cache")
        if args.only in (None, "T"):
            T_res = sweep_T(args, tmp) | meta | {"load": f"{meta['load_avg_start'][0]:.1f}"}
            T_res["load_avg_end"] = list(os.getloadavg())
            (out / f"sweep_T{suffix}.json").write_text(json.dumps(T_res, indent=1) + "\n")
            plot_T(T_res, out / f"sweep_T{suffix}.png")
        if args.only in (None, "m"):
            m_meta = meta | {"load_avg_start": list(os.getloadavg())}
            m_res = sweep_m(args, tmp) | m_meta
            m_res["load_avg_end"] = list(os.getloadavg())
            (out / f"sweep_m{suffix}.json").write_text(json.dumps(m_res, indent=1) + "\n")
            plot_m(m_res, out / f"sweep_m{suffix}.png")
    if T_res is None and (out / f"sweep_T{suffix}.json").exists():
        T_res = json.loads((out / f"sweep_T{suffix}.json").read_text())
    if m_res is None and (out / f"sweep_m{suffix}.json").exists():
        m_res = json.loads((out / f"sweep_m{suffix}.json").read_text())
    text = markdown(T_res, m_res)
    (out / f"sweeps{suffix}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
