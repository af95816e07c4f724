"""One of two processes, two CPU devices each, computing a data-parallel hypergradient from only
its half of the training set; process 0 prints the largest relative difference from the same
hypergradient computed on one device of its own.

    python multiprocess.py TESTS_DIR PORT PROCESS_ID CHECKPOINT_DIR
"""

import json
import sys

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
tests, port, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)
sys.path.insert(0, tests + "/programs")
sys.path.insert(0, tests)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import hypergradient as hg  # noqa: E402
from sharded import B, N, T, contract_batch, problem, rel, resumed_difference  # noqa: E402

assert jax.device_count() == 4 and jax.local_device_count() == 2, (jax.device_count(), jax.local_device_count())
mesh = Mesh(np.array(jax.devices()), ("data",))
_, _, _, (x, y) = problem(None)
half = slice(pid * N // 2, (pid + 1) * N // 2)  # this process's share only
key = jax.random.PRNGKey(7)
dyn, objective, lam, _ = problem(hg.Batches((x[half], y[half]), B, key=key, mesh=mesh, process_local=True))
spread = hg.hypergrad(dyn, objective, lam, hg.Reverse())
batches = [contract_batch((x, y), t, key) for t in range(T)]
stacked = tuple(jnp.asarray(np.stack([b[i] for b in batches])) for i in range(2))
local = jax.local_devices()[0]
with jax.default_device(local):
    single, objective1, lam1, _ = problem(jax.tree_util.Partial(lambda s, t: (s[0][t], s[1][t]), stacked))
    one = hg.hypergrad(single, objective1, lam1, hg.Reverse())
resumed = resumed_difference(dyn, objective, lam, sys.argv[4])  # every process writes its part of one checkpoint
if pid == 0:
    print(json.dumps({"reverse": max(rel(spread.grad, one.grad), abs(float(spread.value) - float(one.value))),
                      "optimize resumed": resumed}))
jax.distributed.shutdown()
