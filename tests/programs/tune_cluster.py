"""The driver of tests/test_tune_cluster.py, in a process of its own: a process that has run a local
``ray.init`` keeps that instance's authentication mode and can no longer create actors on a cluster
started with another. Connects to the cluster, writes ``OUT/nodes.json`` (the head's and the
worker's node ids) once both nodes are up, runs the trials and writes ``OUT/found.json`` (what
``tune.run`` returned).

    python tune_cluster.py TESTS_DIR ADDRESS MARKS OUT SETTINGS_JSON
"""

import functools
import json
import sys
import time
from pathlib import Path

tests, address, marks, out, settings = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), json.loads(sys.argv[5])
sys.path.insert(0, tests)

import jax  # noqa: E402
import ray  # noqa: E402
from ray import cloudpickle  # noqa: E402
from ray import tune as rt  # noqa: E402

import problems  # noqa: E402
from hypergradient.apps import tune  # noqa: E402

cloudpickle.register_pickle_by_value(problems)  # the workers cannot import the tests' modules


def build_slow(config, *, marks, seconds):
    """The ridge problem, its objective slowed down by ``seconds`` (a slow training run that leaves
    the CPUs free); appends the node it runs on to ``marks/TRIAL_ID``, one line per start."""
    with open(Path(marks) / rt.get_context().get_trial_id(), "a") as f:
        f.write(ray.get_runtime_context().get_node_id() + "\n")
    dyn, objective, lam = problems.ridge_problem(steps=config["steps"])

    def slow_objective(w, lam):
        jax.debug.callback(lambda: time.sleep(seconds))
        return objective(w, lam)

    return dyn, slow_objective, lam


ray.init(address=address, log_to_driver=False)
deadline = time.monotonic() + 120
while len(alive := [n for n in ray.nodes() if n["Alive"]]) < 2:
    if time.monotonic() > deadline:
        sys.exit(f"only {len(alive)} node(s) alive after 120 s")
    time.sleep(0.2)
head = next(n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"])
out.mkdir(parents=True, exist_ok=True)
(out / "nodes.json").write_text(json.dumps({"head": head, "worker": next(n["NodeID"] for n in alive if n["NodeID"] != head)}))

space = {"hyper_lr": rt.grid_search(settings["hyper_lrs"]), "hyper_steps": settings["hyper_steps"],
         "steps": settings["steps"]}
found = tune.run(functools.partial(build_slow, marks=str(marks), seconds=settings["seconds_per_objective"]),
                 space, trials=1, out=out)
(out / "found.json").write_text(json.dumps({"rows": found.rows, "curves": found.curves}))
ray.shutdown()
