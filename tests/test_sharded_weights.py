"""Model parallelism: every method on weights whose hidden units are spread over 4 devices equals
the one-device hypergradient, and the final weights come back laid out as they were given
(Reversible excepted: its flat fixed-point weights are whole on every device)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

PROGRAM = pathlib.Path(__file__).resolve().parent / "programs" / "sharded_weights.py"


@pytest.mark.slow
def test_every_method_on_weights_sharded_over_four_devices_equals_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(PROGRAM)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    diffs, kept = result["diff"], result["kept"]
    methods = {"reverse", "checkpoint", "forward", "truncated", "reversible", "drmad", "es", "pes", "implicit"}
    assert set(diffs) == methods | {"checkpoint 2d", "forward 2d", "population", "online pes"}
    assert all(d < 1e-10 for d in diffs.values()), diffs
    assert {name for name, same in kept.items() if not same} == {"reversible"}, kept
