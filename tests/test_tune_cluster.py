"""Trials on a two-node Ray cluster on loopback: the worker node dies while trials run, and every
trial still finishes with all its hyper-steps, the killed one resumed from its checkpoint.

The test starts the two nodes itself (``ray start --block``, each in a session of its own) and the
driver (``programs/tune_cluster.py``, which runs ``tune.run``), and kills exactly their process
trees; it never runs ``ray stop``, which would stop every Ray instance of the machine's user.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hypergradient as hg  # noqa: E402
import problems  # noqa: E402
from ray_processes import kill_tree, ray_env  # noqa: E402

pytestmark = pytest.mark.end_to_end  # left to `make test` by the floor leg (Makefile)

TESTS = Path(__file__).resolve().parent
SETTINGS = {"hyper_steps": 12, "hyper_lrs": [1e-2, 3e-2, 1e-1], "steps": 10,
            "seconds_per_objective": 0.4}  # > 5 hyper-steps a trial between driver checkpoints (2 s)
STARTUP_SECONDS = 120
REGISTER_SECONDS = 1.0  # from a checkpoint in storage to the kill; about 3 s of the trial are left then


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


@pytest.fixture
def cluster():
    """A head and a worker node on 127.0.0.1; yields ``(address, worker process, environment)``."""
    env = ray_env(JAX_ENABLE_X64="1")
    root = Path(tempfile.mkdtemp(prefix="hg-ray-"))  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    nodes = []
    try:
        nodes.append(start_node(root / "head", env, "--head", f"--port={port}", "--include-dashboard=false"))
        wait_for(lambda: port_open(port), "head node")
        nodes.append(start_node(root / "worker", env, f"--address=127.0.0.1:{port}"))
        yield f"127.0.0.1:{port}", nodes[1], env
    finally:
        for proc in reversed(nodes):
            kill_tree(proc)
        shutil.rmtree(root, ignore_errors=True)


def kill_when_checkpointed(proc, marks: Path, out: Path, killed: dict) -> None:
    """Kill the worker node once a trial on it has a Tune checkpoint in storage."""
    def checkpointed_there():
        for mark in marks.iterdir():
            if mark.read_text().startswith(worker) and any((out / "ray").glob(f"*{mark.name}*/checkpoint_*")):
                return mark.name
        return None

    try:
        worker = wait_for(lambda: (out / "nodes.json").is_file() and json.loads((out / "nodes.json").read_text()),
                          "cluster of two nodes")["worker"]
        killed["trial"] = wait_for(checkpointed_there, "checkpoint of a trial on the worker node")
        # The worker writes the folder before the driver registers the checkpoint (the report's save
        # task must come back); a node killed in between restarts the trial from scratch.
        time.sleep(REGISTER_SECONDS)
        kill_tree(proc)
    except TimeoutError as e:
        killed["error"] = str(e)


def reference_curve(hyper_lr: float) -> list[float]:
    """f(λ_k) of an uninterrupted run in this process."""
    dyn, objective, lam = problems.ridge_problem(steps=SETTINGS["steps"])
    res = hg.optimize(dyn, objective, lam, hyper_optimizer=optax.adam(hyper_lr),
                      hyper_steps=SETTINGS["hyper_steps"], progress=False)
    return list(res.history["value"])


@pytest.mark.slow
def test_trials_survive_the_death_of_a_worker_node(cluster, tmp_path):
    address, worker_proc, env = cluster
    marks, out = tmp_path / "marks", tmp_path / "out"
    marks.mkdir()
    killed: dict = {}
    killer = threading.Thread(target=kill_when_checkpointed, args=(worker_proc, marks, out, killed))
    killer.start()
    driver = subprocess.Popen([sys.executable, str(TESTS / "programs" / "tune_cluster.py"), str(TESTS), address,
                               str(marks), str(out), json.dumps(SETTINGS)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        _, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            kill_tree(driver)
        killer.join()
    assert driver.returncode == 0, err[-3000:]
    assert "trial" in killed, killed.get("error")

    found = json.loads((out / "found.json").read_text())
    nodes = json.loads((out / "nodes.json").read_text())
    hyper_steps = SETTINGS["hyper_steps"]
    assert sorted(r["hyper_lr"] for r in found["rows"]) == SETTINGS["hyper_lrs"]
    for row in found["rows"]:
        assert row["status"] == "done" and row["hyper_steps_run"] == hyper_steps, row
        curve = found["curves"][row["trial"]]
        np.testing.assert_allclose(curve, reference_curve(row["hyper_lr"]), rtol=1e-9)
        assert row["best_objective"] <= min(curve)
    starts = {m.name: m.read_text().split() for m in marks.iterdir()}
    assert {s[0] for s in starts.values()} == {nodes["worker"], nodes["head"]}  # both nodes ran trials
    # The killed trial started again on the head node and went on from its checkpoint: the new
    # worker process's first report is past hyper-step 0 and no later than where the first stopped.
    assert starts[killed["trial"]] == [nodes["worker"], nodes["head"]]
    reports = [json.loads(line) for line in next((out / "ray").glob(f"*{killed['trial']}*/result.json")).open()]
    first, second = sorted({r["pid"] for r in reports}, key=[r["pid"] for r in reports].index)
    before = [r["hyper_step"] for r in reports if r["pid"] == first]
    after = [r["hyper_step"] for r in reports if r["pid"] == second and "hyper_step" in r]
    assert before == list(range(len(before))) and 0 < after[0] <= before[-1] + 1
    assert after == list(range(after[0], hyper_steps))
