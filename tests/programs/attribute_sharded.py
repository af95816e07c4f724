"""Attribution on data spread over 4 devices: the batches' ids name the rows they hold, and the
scores equal central finite differences in the example weights on the same sharded run.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=4; prints one JSON line: check -> error.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

jax.config.update("jax_enable_x64", True)

import hypergradient as hg  # noqa: E402

D, N, B, T = 4, 32, 8, 6
rng = np.random.default_rng(0)
x, y = rng.normal(size=(N, 3)), rng.normal(size=N)
xv, yv = rng.normal(size=(8, 3)), rng.normal(size=8)
mesh = Mesh(np.array(jax.devices()[:D]), ("data",))


def loss(w, lam, batch, *, example_weights=1.0):
    bx, by = batch
    return jnp.mean(example_weights * (bx @ w - by) ** 2) + lam["l2"] * jnp.sum(w ** 2)


def objective(w, lam):
    return jnp.mean((xv @ w - yv) ** 2)


out = {"devices": len(jax.devices())}
lam = {"l2": jnp.asarray(0.01)}
for name, key in (("ordered", None), ("shuffled", jax.random.key(1))):
    data = hg.Batches((x, y), B, key=key, mesh=mesh)
    ids_and_rows = jax.jit(jax.vmap(lambda t: (data.indices(t), data(t)[0])))
    ids, rows = map(np.asarray, ids_and_rows(jnp.arange(T)))
    out[f"ids {name}"] = float(np.abs(x[ids] - rows).max())
    if key is None:
        continue
    dyn = hg.Dynamics(jnp.zeros(3), loss, hg.optim.sgd(), lambda lam, t: {"lr": 0.1}, data=data, steps=T)
    scores = hg.attribute(dyn, objective, lam).scores
    run = hg.example_weights.weighted(dyn)
    eps, some = 1e-5, [0, 9, 18, 31]
    f = jax.jit(jax.vmap(lambda u: objective(run.run((lam, u)), lam)))
    bumps = np.eye(N)[some] * eps
    outcomes = np.asarray(f(np.concatenate([1 + bumps, 1 - bumps])))
    fd = (outcomes[:len(some)] - outcomes[len(some):]) / (2 * eps)
    out[f"scores {name}"] = float(np.abs(scores[some] - fd).max() / np.abs(fd).max())
print(json.dumps(out))
