"""Data parallelism: every method on dynamics whose examples are spread over 4 devices equals the
one-device hypergradient of the same batches, in one process and across two."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

TESTS = pathlib.Path(__file__).resolve().parent


def run(args, devices, timeout=600):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_every_method_on_four_devices_equals_one_device():
    proc = run([TESTS / "programs" / "sharded.py", TESTS], devices=4)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    diffs = json.loads(out.strip().splitlines()[-1])
    assert diffs.pop("devices") == 4
    assert set(diffs) >= {f"{m} {o}" for m in ("reverse", "checkpoint", "forward", "truncated", "reversible", "drmad")
                          for o in ("ordered", "shuffled")} | {"implicit", "optimize", "online", "online trho",
                                                               "population", "optimize resumed"} | {
        f"{m} stateful {o}" for m in ("reverse", "checkpoint", "forward") for o in ("ordered", "shuffled")}
    assert all(d < 1e-8 for d in diffs.values()), diffs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_each_with_half_the_data(tmp_path):
    port = _free_port()
    procs = [run([TESTS / "programs" / "multiprocess.py", TESTS, port, i, tmp_path], devices=2) for i in range(2)]
    try:
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:  # exactly the processes this test started
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    diffs = json.loads(results[0][0].strip().splitlines()[-1])
    assert diffs["reverse"] < 1e-8 and diffs["optimize resumed"] < 1e-8, diffs
