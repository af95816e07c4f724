"""How a benchmark hands over what it measured: a report as JSON, or one implementation's record.

Numpy only, so that the peers' processes import no JAX.
"""

from __future__ import annotations

import json
import os

import numpy as np


def emit(record: dict, grads: dict, *, load_at_start: float, save_grads: str | None = None,
         json_line: bool = False) -> None:
    """Print the record of one implementation's process (``run_ours``, ``peers.run_peer``).

    Adds the hypergradient's norms, the CPUs this process may run on and the load average at its
    start and now; writes ``record["value"]`` and ``grads`` to ``save_grads`` (.npz) when given.
    Prints one JSON line with ``json_line`` (what ``bench.run_impl`` reads), else a line a field.
    """
    record = {**record, "grad_norms": {k: float(np.linalg.norm(g)) for k, g in grads.items()},
              "cpus_available": len(os.sched_getaffinity(0)), "load_avg_1min_start": load_at_start,
              "load_avg_1min": os.getloadavg()[0]}
    if save_grads:
        np.savez(save_grads, value=np.float64(record["value"]), **grads)
    if json_line:
        print(json.dumps(record))
    else:
        for k, v in record.items():
            print(f"{k:18s} {v}")


def write_report(report: dict, out: str | None) -> None:
    """Print a benchmark's report as JSON, and write it to ``out`` too when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
