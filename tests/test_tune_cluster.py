"""Trials on a two-node Ray cluster on loopback: the worker node dies while trials run, and every
trial still finishes with all its hyper-steps, the killed one resumed from its checkpoint.

The test starts the two nodes itself (``ray start --block``, each in a session of its own) and
kills exactly their process trees; it never runs ``ray stop``, which would stop every Ray
instance of the machine's user.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import psutil  # noqa: E402
from ray import cloudpickle  # noqa: E402
from ray import tune as rt  # noqa: E402

import hypergradient as hg  # noqa: E402
import problems  # noqa: E402
from hypergradient.apps import tune  # noqa: E402

HYPER_STEPS = 12
SECONDS_PER_OBJECTIVE = 0.4  # a slow training run that leaves the CI's two cores free
HYPER_LRS = (1e-2, 3e-2, 1e-1)
STARTUP_SECONDS = 120

cloudpickle.register_pickle_by_value(problems)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def build_slow(config, *, marks):
    """The ridge problem, its objective slowed down; appends the node it runs on to ``marks/TRIAL_ID``
    (one line per start of the trial)."""
    from ray import tune as rt

    with open(Path(marks) / rt.get_context().get_trial_id(), "a") as f:
        f.write(ray.get_runtime_context().get_node_id() + "\n")
    dyn, objective, lam = problems.ridge_problem(steps=config["steps"])

    def slow_objective(w, lam):
        jax.debug.callback(lambda: time.sleep(SECONDS_PER_OBJECTIVE))
        return objective(w, lam)

    return dyn, slow_objective, lam


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(temp_dir: Path, env: dict, *args: str) -> subprocess.Popen:
    """``ray start --block`` with one CPU, in a new session (its own process group)."""
    temp_dir.mkdir()
    log = open(temp_dir / "ray-start.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus=1",
         "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats", *args],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL the node's process tree: its process group and the workers its raylet started
    (each in a process group of its own)."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def wait_for(condition, what: str, seconds: float = STARTUP_SECONDS):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {seconds} s")
        time.sleep(0.2)
    return value


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def alive_nodes(count: int) -> list[dict] | None:
    alive = [n for n in ray.nodes() if n["Alive"]]
    return alive if len(alive) == count else None


@pytest.fixture
def cluster(monkeypatch):
    """A head and a worker node on 127.0.0.1, this process connected to them; yields
    ``(worker process, worker node id, head node id)``."""
    # Ray 2.60 turns token authentication on for `ray start --head` wherever ~/.ray/auth_token
    # exists (any local ray.init creates it), but not for a node joining by address, which then
    # never gets in: off for both nodes and for this process.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    src = Path(hg.__file__).resolve().parents[1]  # the workers import this checkout, not an installed one
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1",
           "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    root = Path(tempfile.mkdtemp(prefix="hg-ray-"))  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    nodes = []
    try:
        nodes.append(start_node(root / "head", env, "--head", f"--port={port}", "--include-dashboard=false"))
        wait_for(lambda: port_open(port), "head node")
        nodes.append(start_node(root / "worker", env, f"--address=127.0.0.1:{port}"))
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        alive = wait_for(lambda: alive_nodes(2), "second node")
        head = next(n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"])
        worker = next(n["NodeID"] for n in alive if n["NodeID"] != head)
        yield nodes[1], worker, head
    finally:
        ray.shutdown()
        for proc in reversed(nodes):
            kill_node(proc)
        shutil.rmtree(root, ignore_errors=True)


def kill_when_checkpointed(proc, worker: str, marks: Path, storage: Path, killed: dict) -> None:
    """Kill the worker node once a trial on it has a Tune checkpoint in storage."""
    def checkpointed_there():
        for mark in marks.iterdir():
            if mark.read_text().startswith(worker) and any(storage.glob(f"*{mark.name}*/checkpoint_*")):
                return mark.name
        return None

    try:
        killed["trial"] = wait_for(checkpointed_there, "checkpoint of a trial on the worker node")
        kill_node(proc)
    except TimeoutError as e:
        killed["error"] = str(e)


def reference_curve(hyper_lr: float) -> list[float]:
    """f(λ_k) of an uninterrupted run in this process."""
    dyn, objective, lam = problems.ridge_problem(steps=10)
    res = hg.optimize(dyn, objective, lam, hyper_optimizer=optax.adam(hyper_lr), hyper_steps=HYPER_STEPS,
                      progress=False)
    return list(res.history["value"])


@pytest.mark.slow
def test_trials_survive_the_death_of_a_worker_node(cluster, tmp_path):
    worker_proc, worker, head = cluster
    marks, out = tmp_path / "marks", tmp_path / "out"
    marks.mkdir()
    killed: dict = {}
    killer = threading.Thread(target=kill_when_checkpointed, args=(worker_proc, worker, marks, out / "ray", killed))
    killer.start()
    try:
        space = {"hyper_lr": rt.grid_search(list(HYPER_LRS)), "hyper_steps": HYPER_STEPS, "steps": 10}
        found = tune.run(functools.partial(build_slow, marks=str(marks)), space, trials=1, out=out)
    finally:
        killer.join()
    assert "trial" in killed, killed.get("error")

    assert len(found.rows) == len(HYPER_LRS)
    for row in found.rows:
        assert row["status"] == "done" and row["hyper_steps_run"] == HYPER_STEPS, row
        curve = found.curves[row["trial"]]
        np.testing.assert_allclose(curve, reference_curve(row["hyper_lr"]), rtol=1e-9)
        assert row["best_objective"] <= min(curve)
    starts = {m.name: m.read_text().split() for m in marks.iterdir()}
    assert {nodes[0] for nodes in starts.values()} == {worker, head}  # both nodes ran trials
    # The killed trial started again on the head node and went on from its checkpoint: the new
    # worker process's first report is past hyper-step 0 and no later than where the first stopped.
    assert starts[killed["trial"]] == [worker, head]
    reports = [json.loads(line) for line in next((out / "ray").glob(f"*{killed['trial']}*/result.json")).open()]
    first, second = (sorted({r["pid"] for r in reports}, key=[r["pid"] for r in reports].index))
    before = [r["hyper_step"] for r in reports if r["pid"] == first]
    after = [r["hyper_step"] for r in reports if r["pid"] == second and "hyper_step" in r]
    assert before == list(range(len(before))) and 0 < after[0] <= before[-1] + 1
    assert after == list(range(after[0], HYPER_STEPS))
