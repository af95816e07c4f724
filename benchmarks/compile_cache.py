"""What a second ``hypergradient run`` compiles, with the command's persistent compilation cache on
(its default) and empty before the first.

For each experiment, the same command runs twice, each in a fresh process, with
``XDG_CACHE_HOME`` pointed at a new temporary folder (so the cache starts empty and nothing of
the user's is read or written). JAX's monitoring events give, per run, the seconds XLA spent
compiling (``backend_compile_duration``: on a cache hit, the read) and the cache's hits and
misses; the wall time is the whole command. The ratio second / first says how much of the
compiling a second run still does (the tracing and lowering are not cached).

    python -m benchmarks.compile_cache [--runs "schedules --hyper-steps 2" "resnet --tiny"] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.record import write_report

MONITORED = """
import collections, json, sys
from jax import monitoring

seconds, events = collections.Counter(), collections.Counter()
monitoring.register_event_duration_secs_listener(lambda e, d, **kw: seconds.update({e: d}))
monitoring.register_event_listener(lambda e, **kw: events.update([e]))
from hypergradient.apps.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": seconds, "events": events}))
sys.exit(code)
"""
COMPILE = "/jax/core/compile/backend_compile_duration"


def one_run(args: list[str], out: str, env: dict, timeout: float | None = None) -> dict:
    """The command ``hypergradient run ARGS --out OUT`` in a fresh process (killed after ``timeout``
    seconds, if given): compile seconds, cache hits and misses, wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MONITORED, "run", *args, "--no-progress", "--out", out],
                          capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"hypergradient run {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    return {"compile_seconds": seen["seconds"].get(COMPILE, 0.0), "wall_seconds": wall,
            "cache_hits": seen["events"].get("/jax/compilation_cache/cache_hits", 0),
            "cache_misses": seen["events"].get("/jax/compilation_cache/cache_misses", 0)}


def measure(command: str) -> dict:
    """Two runs of ``hypergradient run COMMAND`` on one empty cache."""
    args = command.split()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": os.path.join(tmp, "xdg")}
        env.pop("HYPERGRADIENT_COMPILE_CACHE", None)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        first = one_run(args, os.path.join(tmp, "first"), env)
        second = one_run(args, os.path.join(tmp, "second"), env)
    return {"command": f"hypergradient run {command}", "first": first, "second": second,
            "compile_ratio": second["compile_seconds"] / first["compile_seconds"],
            "wall_ratio": second["wall_seconds"] / first["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["schedules --hyper-steps 2", "resnet --tiny"],
                        help="the arguments of each `hypergradient run` to measure")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    print("| command | XLA compile, first → second | ratio | cache hits / misses (second) | wall, first → second |")
    print("|---|---|---:|---|---|")
    for command in args.runs:
        row = measure(command)
        rows.append(row)
        f, s = row["first"], row["second"]
        print(f"| `{row['command']}` | {f['compile_seconds']:.1f} s → {s['compile_seconds']:.2f} s | "
              f"{row['compile_ratio']:.3f} | {s['cache_hits']} / {s['cache_misses']} | "
              f"{f['wall_seconds']:.0f} s → {s['wall_seconds']:.0f} s |", flush=True)
    write_report({"rows": rows}, args.out)


if __name__ == "__main__":
    main()
