"""Every method on weights sharded over a "model" mesh axis against the same run on one device.

Run in its own process with XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag must be
set before JAX starts); prints one JSON line: case -> largest relative difference, and for each
case whether the final weights came back with the shardings they were given.
"""

import json
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

jax.config.update("jax_enable_x64", True)

import hypergradient as hg  # noqa: E402

D, N, B, T, H = 4, 32, 8, 6, 8  # H: the hidden width, split over the model axis


def arrays():
    rng = np.random.default_rng(3)
    x, xv = rng.normal(size=(N, 4)), rng.normal(size=(16, 4))
    teacher = rng.normal(size=4)
    return x, np.sin(x @ teacher), xv, np.sin(xv @ teacher)


def loss(w, lam, batch):
    bx, by = batch
    return jnp.mean((jnp.tanh(bx @ w["a"]) @ w["b"] - by) ** 2) + jnp.exp(lam["log_l2"]) * jnp.sum(w["a"] ** 2)


def weights(mesh):
    """The MLP's weights, its hidden dimension split over ``mesh``'s "model" axis (or on one device)."""
    rng = np.random.default_rng(0)
    w = {"a": rng.normal(size=(4, H)) / 2, "b": rng.normal(size=H) / 2}
    if mesh is None:
        return jax.tree.map(jnp.asarray, w)
    specs = {"a": PartitionSpec(None, "model"), "b": PartitionSpec("model")}
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), w, specs)


def problem(w0, data, steps=T):
    x, y, xv, yv = arrays()
    dyn = hg.Dynamics(init=w0, loss=loss, optimizer=hg.optim.momentum(),
                      optimizer_hparams=lambda lam, t: {"lr": lam["lr"][t], "momentum": 0.5}, data=data, steps=steps)
    objective = jax.tree_util.Partial(lambda xv, yv, w, lam: jnp.mean((jnp.tanh(xv @ w["a"]) @ w["b"] - yv) ** 2),
                                      jnp.asarray(xv), jnp.asarray(yv))
    return dyn, objective, {"log_l2": jnp.asarray(-2.0), "lr": jnp.full(steps, 0.1)}


def rel(a, b):
    a, b = (np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t)]) for t in (a, b))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def kept(params, w0):
    """Whether every final weight is laid out over the devices as its initial weight was."""
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(w0))
    return all(p.sharding.is_equivalent_to(w.sharding, p.ndim) for p, w in pairs)


METHODS = [("reverse", hg.Reverse()), ("checkpoint", hg.Reverse(checkpoint_every=2)), ("forward", hg.Forward()),
           ("truncated", hg.Truncated(3)), ("reversible", hg.Reversible()), ("drmad", hg.DrMAD()),
           ("es", hg.ES(sigma=0.05, pairs=2, key=1)), ("pes", hg.PES(sigma=0.05, pairs=2, key=1))]


def compare(out, tag, sharded, single, methods):
    (dyn, objective, lam), (dyn1, objective1, _) = sharded, single
    for name, method in methods:
        a = hg.hypergrad(dyn, objective, lam, method)
        b = hg.hypergrad(dyn1, objective1, lam, method)
        out["diff"][f"{name}{tag}"] = max(rel(a.grad, b.grad), rel(a.params, b.params), abs(float(a.value - b.value)))
        out["kept"][f"{name}{tag}"] = kept(a.params, dyn.init)


def main():
    warnings.simplefilter("ignore", hg.ImplicitWarning)  # the same caveat on both sides of the comparison
    out = {"devices": len(jax.devices()), "diff": {}, "kept": {}}
    x, y, _, _ = arrays()
    model = Mesh(np.array(jax.devices()[:D]), ("model",))
    single = problem(weights(None), hg.Batches((x, y), B))
    compare(out, "", problem(weights(model), hg.Batches((x, y), B)), single, METHODS)

    # Implicit: full-batch training long enough to be near a stationary point
    full, full1 = (problem(weights(m), (jnp.asarray(x), jnp.asarray(y)), steps=200) for m in (model, None))
    compare(out, "", full, full1, [("implicit", hg.Implicit())])

    # data × model: examples over "data", hidden units over "model"; one device gets the same batches
    grid = Mesh(np.array(jax.devices()[:D]).reshape(2, 2), ("data", "model"))
    spread = hg.Batches((x, y), B, key=jax.random.PRNGKey(7), mesh=grid, axis="data")
    batches = [tuple(np.asarray(a) for a in spread(jnp.asarray(t))) for t in range(T)]
    stacked = tuple(jnp.asarray(np.stack([b[i] for b in batches])) for i in range(2))
    same = jax.tree_util.Partial(lambda s, t: (s[0][t], s[1][t]), stacked)
    compare(out, " 2d", problem(weights(grid), spread), problem(weights(None), same), [METHODS[1], METHODS[2]])

    # a population of λ (vmapped) training the sharded weights, and online tuning carrying them (and
    # PES's perturbed copies of them) from one segment to the next
    dyn, objective, lam = problem(weights(model), hg.Batches((x, y), B))
    members = jax.tree.map(lambda v: jnp.stack([v * s for s in (0.5, 1.0, 1.5)]), lam)
    kwargs = dict(hyper_optimizer=optax.adam(0.05), progress=False)
    a = hg.optimize(dyn, objective, members, hyper_steps=2, population_axis=0, **kwargs)
    b = hg.optimize(single[0], single[1], members, hyper_steps=2, population_axis=0, **kwargs)
    out["diff"]["population"] = max(rel(a.population_values, b.population_values), rel(a.hparams, b.hparams))
    a = hg.online(dyn, objective, lam, METHODS[-1][1], every=3, **kwargs)
    b = hg.online(single[0], single[1], lam, METHODS[-1][1], every=3, **kwargs)
    out["diff"]["online pes"] = rel(a.hparams, b.hparams)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
