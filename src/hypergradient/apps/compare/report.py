"""The comparison's outputs: the summary table, trace.csv, summary.csv/.md and trace.png."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..experiments.plots import pyplot, savefig
from .clock import Run

COLORS = {"random": "tab:gray", "tpe": "tab:orange", "hypergradient": "tab:blue", "es": "tab:cyan",
          "online": "tab:green", "pes": "tab:olive", "hybrid": "tab:purple"}


def _mean_std(xs) -> tuple[float, float]:
    xs = np.asarray([x for x in xs if np.isfinite(x)], np.float64)
    if not len(xs):
        return float("nan"), float("nan")
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def summarize(runs: Sequence[Run], sizes: Mapping[str, int]) -> list[dict]:
    """One row per regime and method: mean and std over seeds."""
    rows = []
    for regime in dict.fromkeys(r.regime for r in runs):
        for method in dict.fromkeys(r.method for r in runs if r.regime == regime):
            group = [r for r in runs if r.regime == regime and r.method == method]
            val, val_sd = _mean_std([r.best_val for r in group])
            err, err_sd = _mean_std([r.test_error for r in group])
            tl, tl_sd = _mean_std([r.test_loss for r in group])
            rows.append({
                "regime": regime, "hyperparameters": sizes[regime], "method": method, "seeds": len(group),
                "best_val_loss": val, "best_val_loss_std": val_sd, "test_error": err, "test_error_std": err_sd,
                "test_loss": tl, "test_loss_std": tl_sd,
                "evaluations": float(np.mean([r.evaluations for r in group])),
            })
    return rows


def summary_markdown(rows: Sequence[dict], budget: float) -> str:
    lines = [
        f"Budget {budget:g} s per method, regime and seed (compilation excluded). Mean ± std over seeds.",
        "",
        "| regime | λ size | method | best val loss | test error | test loss | evaluations |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [_pm(r[k], r[k + "_std"], r["seeds"]) for k in ("best_val_loss", "test_error", "test_loss")]
        lines.append(f"| {r['regime']} | {r['hyperparameters']} | {r['method']} | {' | '.join(cells)} "
                     f"| {r['evaluations']:.0f} |")
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float, n: int) -> str:
    if not np.isfinite(mean):
        return "—"
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def write_outputs(out: Path, runs, summary, budget, experiment, dataset, compile_seconds, storage_spec) -> None:
    with open(out / "trace.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "regime", "seed", "seconds", "best_val"])
        for r in runs:
            for seconds, best in r.trace:
                w.writerow([r.method, r.regime, r.seed, f"{seconds:.4f}", f"{best:.8g}"])
    columns = list(summary[0]) if summary else []
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in summary:
            w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    md = [f"# compare {experiment} on {dataset}", "", summary_markdown(summary, budget),
          "compile seconds per regime (excluded): "
          + ", ".join(f"{k} {v:.1f}" for k, v in compile_seconds.items()), "",
          f"Optuna storage: `{storage_spec}`", ""]
    md += ["| regime | method | seed | evaluations | note |", "|---|---|---:|---:|---|"]
    md += [f"| {r.regime} | {r.method} | {r.seed} | {r.evaluations} | {r.note} |" for r in runs]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    plot_trace(out / "trace.png", runs, budget, experiment, dataset)


def plot_trace(path: Path, runs: Sequence[Run], budget: float, experiment: str, dataset: str) -> None:
    plt = pyplot()
    regimes = list(dict.fromkeys(r.regime for r in runs))
    fig, axes = plt.subplots(1, max(1, len(regimes)), figsize=(5.2 * max(1, len(regimes)), 3.8), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        labelled, finite = set(), []
        for r in runs:
            if r.regime != regime or not r.trace:
                continue
            xs = [s for s, _ in r.trace] + [budget]
            ys = [v for _, v in r.trace] + [r.trace[-1][1]]
            finite += ys
            ax.step(xs, ys, where="post", color=COLORS.get(r.method), alpha=0.85,
                    label=None if r.method in labelled else r.method)
            labelled.add(r.method)
        if finite:  # log scale: a diverging black-box trial can be 10x worse than a good one
            ax.set_yscale("log")
        ax.set(title=f"{experiment} ({dataset}): {regime} hyperparameters", xlabel="seconds (compile excluded)",
               ylabel="best validation loss so far", xlim=(0, budget))
        ax.legend(fontsize=8)
    savefig(fig, path)


def print_summary(rows: Sequence[dict], budget: float, out: Path) -> None:
    print(summary_markdown(rows, budget))
    print(f"wrote trace.csv, summary.csv, summary.md, trace.png to {out}")
