"""Every method on data-parallel dynamics against the same batches on one device.

Run in its own process with XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag must be
set before JAX starts); prints one JSON line: method -> largest relative difference.
"""

import json
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, sys.argv[1])  # tests/, for problems.py

import hypergradient as hg  # noqa: E402
from problems import ridge_data  # noqa: E402

D, N, B, T = 4, 32, 8, 6


def contract_batch(arrays, t, key):
    """Step t's global batch as the data-parallel contract states it, computed on the host."""
    block, local = N // D, B // D
    nb = block // local
    epoch, i = divmod(t, nb)
    rows = []
    for d in range(D):
        idx = np.arange(block)
        if key is not None:
            k = jax.random.fold_in(jax.random.fold_in(key, epoch), d)
            idx = np.asarray(hg.data.permutation(k, block, np.arange(block)))
        rows.append(d * block + idx[i * local:(i + 1) * local])
    rows = np.concatenate(rows)
    return tuple(a[rows] for a in arrays)


def problem(data):
    x, y, xv, yv = ridge_data(n=N, nv=16, d=4, seed=3)

    def loss(w, lam, batch):
        bx, by = batch
        return jnp.mean((jnp.tanh(bx @ w["a"]) @ w["b"] - by) ** 2) + jnp.exp(lam["log_l2"]) * jnp.sum(w["a"] ** 2)

    rng = np.random.default_rng(0)
    w0 = {"a": jnp.asarray(rng.normal(size=(4, 5)) / 2), "b": jnp.asarray(rng.normal(size=5) / 2)}
    dyn = hg.Dynamics(init=w0, loss=loss, optimizer=hg.optim.momentum(),
                      optimizer_hparams=lambda lam, t: {"lr": lam["lr"][t], "momentum": 0.5}, data=data, steps=T)
    objective = jax.tree_util.Partial(lambda xv, yv, w, lam: jnp.mean((jnp.tanh(xv @ w["a"]) @ w["b"] - yv) ** 2),
                                      jnp.asarray(xv), jnp.asarray(yv))
    lam = {"log_l2": jnp.asarray(-2.0), "lr": jnp.full(T, 0.1)}
    return dyn, objective, lam, (x, y)


def stateful_problem(data):
    """The same network with a running mean of its hidden layer (model state, read by the
    objective) and dropout drawn from the step's key over the global batch."""
    x, y, xv, yv = ridge_data(n=N, nv=16, d=4, seed=3)

    def loss(w, lam, batch, *, state, key):
        bx, by = batch
        h = jnp.tanh(bx @ w["a"])
        mask = jax.random.bernoulli(key, 0.75, h.shape) / 0.75
        value = jnp.mean(((h * mask) @ w["b"] - by) ** 2) + jnp.exp(lam["log_l2"]) * jnp.sum(w["a"] ** 2)
        return value, 0.7 * state + 0.3 * jnp.mean(h, 0)

    rng = np.random.default_rng(0)
    w0 = {"a": jnp.asarray(rng.normal(size=(4, 5)) / 2), "b": jnp.asarray(rng.normal(size=5) / 2)}
    dyn = hg.Dynamics(init=w0, loss=loss, optimizer=hg.optim.momentum(),
                      optimizer_hparams=lambda lam, t: {"lr": lam["lr"][t], "momentum": 0.5}, data=data, steps=T,
                      state=jnp.zeros(5), key=jax.random.key(5))
    objective = jax.tree_util.Partial(
        lambda xv, yv, w, lam, state: jnp.mean(((jnp.tanh(xv @ w["a"]) - state) @ w["b"] - yv) ** 2),
        jnp.asarray(xv), jnp.asarray(yv))
    return dyn, objective


def rel(a, b):
    a, b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]), np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def resumed_difference(dyn, objective, lam, directory):
    """A sharded run checkpointed at hyper-step 2 and resumed to 3, against 3 in one go."""
    from hypergradient.drivers import checkpoint

    checkpoint.CHECKPOINT_SECONDS = 0.0
    kwargs = dict(hyper_optimizer=optax.adam(0.05), progress=False)
    hg.optimize(dyn, objective, lam, hyper_steps=2, checkpoint_dir=directory + "/a", **kwargs)
    resumed = hg.optimize(dyn, objective, lam, hyper_steps=3, checkpoint_dir=directory + "/a", **kwargs)
    straight = hg.optimize(dyn, objective, lam, hyper_steps=3, **kwargs)
    return rel(resumed.hparams, straight.hparams)


def main():
    warnings.simplefilter("ignore", hg.ImplicitWarning)  # the same caveat on both sides of the comparison
    mesh = Mesh(np.array(jax.devices()[:D]), ("data",))
    out = {"devices": len(jax.devices())}
    _, _, _, (x, y) = problem(None)
    for key in (None, jax.random.PRNGKey(7)):
        sharded = hg.Batches((x, y), B, key=key, mesh=mesh)
        dyn, objective, lam, _ = problem(sharded)
        batches = [contract_batch((x, y), t, key) for t in range(T)]
        stacked = tuple(jnp.asarray(np.stack([b[i] for b in batches])) for i in range(2))
        single, _, _, _ = problem(jax.tree_util.Partial(lambda s, t: (s[0][t], s[1][t]), stacked))
        shuffled = "shuffled" if key is not None else "ordered"
        out[f"batch {shuffled}"] = rel(sharded(jnp.asarray(3)), batches[3])
        shard_obj = jax.tree_util.Partial(objective.func, *hg.data.shard(tuple(objective.args), mesh))
        for name, method in [("reverse", hg.Reverse()), ("checkpoint", hg.Reverse(checkpoint_every=2)),
                             ("forward", hg.Forward()), ("truncated", hg.Truncated(3)),
                             ("reversible", hg.Reversible()), ("drmad", hg.DrMAD())]:
            a = hg.hypergrad(dyn, shard_obj, lam, method)
            b = hg.hypergrad(single, objective, lam, method)
            out[f"{name} {shuffled}"] = max(rel(a.grad, b.grad), abs(float(a.value) - float(b.value)))
        # a model state and dropout keys: the loss sees the global batch and one key per step
        dyn_s, objective_s = stateful_problem(sharded)
        single_s, _ = stateful_problem(single.data)
        shard_obj_s = jax.tree_util.Partial(objective_s.func, *hg.data.shard(tuple(objective_s.args), mesh))
        for name, method in [("reverse", hg.Reverse()), ("checkpoint", hg.Reverse(checkpoint_every=2)),
                             ("forward", hg.Forward())]:
            a = hg.hypergrad(dyn_s, shard_obj_s, lam, method)
            b = hg.hypergrad(single_s, objective_s, lam, method)
            out[f"{name} stateful {shuffled}"] = max(rel(a.grad, b.grad), rel(a.state, b.state),
                                                     abs(float(a.value) - float(b.value)))
    full = hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer, dyn.optimizer_hparams, hg.Batches((x, y), N, mesh=mesh), 200)
    full_single = hg.Dynamics(dyn.init, dyn.loss, dyn.optimizer, dyn.optimizer_hparams, (jnp.asarray(x), jnp.asarray(y)), 200)
    lam200 = {"log_l2": jnp.asarray(-2.0), "lr": jnp.full(200, 0.1)}
    out["implicit"] = rel(hg.hypergrad(full, objective, lam200, hg.Implicit()).grad,
                          hg.hypergrad(full_single, objective, lam200, hg.Implicit()).grad)
    kwargs = dict(hyper_optimizer=optax.adam(0.05), progress=False)
    out["optimize"] = rel(hg.optimize(dyn, objective, lam, hyper_steps=3, **kwargs).hparams,
                          hg.optimize(single, objective, lam, hyper_steps=3, **kwargs).hparams)
    out["online"] = rel(hg.online(dyn, objective, lam, hg.Forward(), every=2, **kwargs).hparams,
                        hg.online(single, objective, lam, hg.Forward(), every=2, **kwargs).hparams)
    out["online trho"] = rel(hg.online(dyn, objective, lam, hg.Truncated(4), every=2, **kwargs).hparams,
                             hg.online(single, objective, lam, hg.Truncated(4), every=2, **kwargs).hparams)
    out["optimize resumed"] = resumed_difference(dyn, objective, lam, tempfile.mkdtemp())
    members = jax.tree.map(lambda x: jnp.stack([x * s for s in (0.5, 0.8, 1.0, 1.2)]), lam)
    pop_mesh = Mesh(np.array(jax.devices()[:D]), ("pop",))
    spread = hg.optimize(single, objective, hg.data.shard(members, pop_mesh, "pop"), hyper_steps=2,
                         population_axis=0, **kwargs)
    together = hg.optimize(single, objective, members, hyper_steps=2, population_axis=0, **kwargs)
    out["population"] = rel(spread.population_values, together.population_values)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
