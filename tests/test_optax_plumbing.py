"""The optax plumbing of the inner optimizer: an optax transformation such as
``optax.chain(clip, adamw)`` as it is, a warmup-cosine schedule whose peak and warmup
length are hyperparameters, and per-layer values for any weight tree (nested dicts,
Equinox modules, Flax NNX states). Hypergradients against central differences in float64."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hypergradient as hg
from problems import (central_difference, eqx_classifier, mlp_problem, outer_value, random_direction, ridge_data,
                      tree_dot)

# -- a GradientTransformation as the inner optimizer ----------------------------------------


def _adamw_chain():
    """The issue's training loop: AdamW under a warmup-cosine learning rate and global-norm clipping,
    with the clipping norm, the weight decay and the schedule's peak and warmup tuned."""
    return optax.chain(
        optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=1.0),
        optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=1e-4),
    )


def _ridge(optimizer, hparams, steps=20):
    x, y, xv, yv = ridge_data()

    def loss(w, lam, batch):
        bx, by = batch
        return jnp.mean((bx @ w["W"] + w["b"] - by) ** 2)

    dyn = hg.Dynamics(init={"W": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}, loss=loss, optimizer=optimizer,
                      optimizer_hparams=hparams, data=(jnp.asarray(x), jnp.asarray(y)), steps=steps)
    return dyn, lambda w, lam: jnp.mean((xv @ w["W"] + w["b"] - yv) ** 2)


def _chain_hparams(steps):
    def hparams(lam, t):
        return {
            "learning_rate": hg.optim.warmup_cosine(t, jnp.exp(lam["log_peak"]), lam["warmup"], steps),
            "weight_decay": jnp.exp(lam["log_wd"]),
            "max_norm": jnp.exp(lam["log_clip"]),
        }

    return hparams


CHAIN_LAM = {"log_peak": jnp.log(0.2), "warmup": jnp.asarray(4.5), "log_wd": jnp.log(0.3),
             "log_clip": jnp.log(1.5)}


def test_an_optax_chain_trains_as_optax_does():
    steps = 20
    tx = _adamw_chain()
    dyn, objective = _ridge(hg.optim.from_optax(tx), _chain_hparams(steps), steps)
    assert dyn.optimizer.name == "optax.chain"
    w_t = dyn.run(CHAIN_LAM)

    # the same run written with optax by hand, the hyperparameters set in the injected states
    x, y, _, _ = ridge_data()
    w = {"W": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
    state = tx.init(w)
    for t in range(steps):
        hp = _chain_hparams(steps)(CHAIN_LAM, t)
        clip, adamw = state
        clip = clip._replace(hyperparams={**clip.hyperparams, "max_norm": hp["max_norm"]})
        adamw = adamw._replace(hyperparams={**adamw.hyperparams, "learning_rate": hp["learning_rate"],
                                            "weight_decay": hp["weight_decay"]})
        g = jax.grad(dyn.loss)(w, CHAIN_LAM, (jnp.asarray(x), jnp.asarray(y)))
        updates, state = tx.update(g, (clip, adamw), w)
        w = optax.apply_updates(w, updates)
    for a, b in zip(jax.tree.leaves(w_t), jax.tree.leaves(w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    assert float(objective(w_t, CHAIN_LAM)) < float(objective(jax.tree.map(jnp.zeros_like, w), CHAIN_LAM))


def test_an_optax_chain_hypergradient_matches_finite_differences():
    steps = 20
    dyn, objective = _ridge(hg.optim.from_optax(_adamw_chain()), _chain_hparams(steps), steps)
    reverse = hg.hypergrad(dyn, objective, CHAIN_LAM, hg.Reverse())
    forward = hg.hypergrad(dyn, objective, CHAIN_LAM, hg.Forward())
    f = outer_value(dyn, objective)
    for name in CHAIN_LAM:  # each component, so that none hides behind another
        direction = jax.tree.map(jnp.zeros_like, CHAIN_LAM)
        direction[name] = jnp.asarray(1.0)
        fd = central_difference(f, CHAIN_LAM, direction)
        assert abs(fd) > 1e-6, f"{name}: the test problem must depend on it"
        np.testing.assert_allclose(float(reverse.grad[name]), fd, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(float(forward.grad[name]), float(reverse.grad[name]), rtol=1e-9, err_msg=name)


def test_a_fixed_transformation_runs_as_it_is_and_names_what_can_be_tuned():
    fixed = hg.optim.from_optax(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05)))
    dyn, objective = _ridge(fixed, lambda lam, t: {}, steps=5)
    assert np.isfinite(float(objective(dyn.run({"unused": jnp.asarray(0.0)}), None)))
    wrong, _ = _ridge(fixed, lambda lam, t: {"learning_rate": lam["lr"]}, steps=5)
    with pytest.raises(ValueError, match=r"no hyperparameter\(s\) \['learning_rate'\].*inject_hyperparams"):
        wrong.run({"lr": jnp.asarray(0.1)})
    typo, _ = _ridge(hg.optim.from_optax(_adamw_chain()), lambda lam, t: {"lr": lam["lr"]}, steps=5)
    takes = r"\['lr'\]; it takes \['b1', 'b2', 'eps', 'eps_root', 'learning_rate', 'max_norm', 'weight_decay'\]"
    with pytest.raises(ValueError, match=takes):
        typo.validate({"lr": jnp.asarray(0.1)})


def test_shared_names_are_qualified_by_the_members_place():
    w = {"a": jnp.ones(3), "b": jnp.ones(2)}
    sgd = optax.inject_hyperparams(optax.sgd)

    def names(tx):
        opt = hg.optim.from_optax(tx)
        return sorted(opt.names_in_state(opt.init(w)))

    chain = names(optax.chain(sgd(learning_rate=0.1), optax.inject_hyperparams(optax.adam)(learning_rate=0.1)))
    assert "0.learning_rate" in chain and "1.learning_rate" in chain and "b1" in chain
    assert "learning_rate" not in chain
    assert names(optax.named_chain(("fast", sgd(learning_rate=0.1)), ("slow", sgd(learning_rate=0.01)))) == [
        "fast.learning_rate", "slow.learning_rate"]
    groups = optax.multi_transform({"x": sgd(learning_rate=0.1), "y": sgd(learning_rate=0.01)}, {"a": "x", "b": "y"})
    opt = hg.optim.from_optax(groups)
    assert sorted(opt.names_in_state(opt.init(w))) == ["x.learning_rate", "y.learning_rate"]
    # each group takes its own learning rate
    new, _ = opt.update(jax.tree.map(jnp.ones_like, w), opt.init(w), w, {"y.learning_rate": 0.5})
    np.testing.assert_allclose(np.asarray(new["a"]), 0.9)
    np.testing.assert_allclose(np.asarray(new["b"]), 0.5)


def test_from_optax_says_what_it_was_given():
    with pytest.raises(TypeError, match=r"got str 'adam'"):
        hg.optim.from_optax("adam")
    with pytest.raises(TypeError, match=r"optax.chain\) takes no keyword arguments \(got \['learning_rate'\]\)"):
        hg.optim.from_optax(_adamw_chain(), learning_rate=0.1)
    w = {"a": jnp.ones(3)}
    scheduled = hg.optim.from_optax(
        optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(0.1, 0.0, 10))))
    with pytest.raises(ValueError, match=r"\['learning_rate'\] is a schedule"):
        scheduled.update(w, scheduled.init(w), w, {"learning_rate": 0.1})
    opt = hg.optim.from_optax(_adamw_chain())
    with pytest.raises(TypeError, match="'learning_rate' must be a number.*multi_transform"):
        opt.update(w, opt.init(w), w, {"learning_rate": hg.optim.per_layer({"x": 0.1}, {"a": "x"})})
    # a factory's boolean arguments are fixed, not hyperparameters
    nesterov = hg.optim.from_optax(optax.sgd, learning_rate=0.1, momentum=0.9, nesterov=True)
    assert nesterov.hparam_names == ("learning_rate", "momentum")
    new, _ = nesterov.update(w, nesterov.init(w), w, {"learning_rate": 0.2})
    np.testing.assert_allclose(np.asarray(new["a"]), 1 - 0.2 * 1.9)


# -- a schedule whose parameters are hyperparameters ------------------------------------


def test_warmup_cosine_is_optax_warmup_cosine_decay():
    steps = jnp.arange(130)
    for init, peak, warmup, decay, end in [(0.0, 0.5, 10, 100, 0.0), (0.1, 2.0, 25, 120, 0.05), (0.0, 1.0, 0, 50, 0.1)]:
        ours = jax.vmap(lambda t: hg.optim.warmup_cosine(t, peak, float(warmup), decay, end=end, init=init))(steps)
        if warmup == 0:  # optax's linear warmup refuses 0 steps; no warmup is the cosine decay alone
            theirs = jax.vmap(optax.cosine_decay_schedule(peak, decay, alpha=end / peak))(steps)
        else:
            theirs = jax.vmap(optax.warmup_cosine_decay_schedule(init, peak, warmup, decay, end))(steps)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("t", [0, 3, 7, 12, 40, 99, 150])
def test_warmup_cosine_gradient_in_peak_and_warmup_matches_finite_differences(t):
    """The warmup length is a real number, so the value moves smoothly with it (t ≠ warmup)."""

    def f(p):
        return hg.optim.warmup_cosine(t, p["peak"], p["warmup"], 100, end=0.01, init=0.02)

    p = {"peak": jnp.asarray(0.7), "warmup": jnp.asarray(9.3)}
    grad = jax.jit(jax.grad(f))(p)  # traced arguments: optax's own schedules refuse them
    for name in p:
        direction = {k: jnp.asarray(float(k == name)) for k in p}
        np.testing.assert_allclose(float(grad[name]), central_difference(f, p, direction), rtol=1e-7, atol=1e-12,
                                   err_msg=f"{name} at t={t}")
    if t >= 100:
        assert float(grad["peak"]) == 0 and float(grad["warmup"]) == 0
    no_warmup = jax.grad(lambda w: hg.optim.warmup_cosine(t, 0.7, w, 100))(jnp.asarray(0.0))
    assert np.isfinite(float(no_warmup))


# -- per-layer values on any weight tree ------------------------------------------------


def _eqx_problem(lr, steps=6):
    model, train, (xv, yv), ce = eqx_classifier()
    dyn = hg.Dynamics(init=model, loss=lambda m, lam, b: ce(m, *b), optimizer=hg.optim.momentum(),
                      optimizer_hparams=lambda lam, t: {"lr": lr(lam), "momentum": 0.5},
                      data=hg.Batches(train, 8), steps=steps)
    return dyn, lambda m, lam: ce(m, xv, yv)


def _head_labels(m):
    last = len(m.layers) - 1
    return jax.tree_util.tree_map_with_path(lambda path, _: "head" if path[1].idx == last else "body", m)


EQX_LAM = {"lr_body": jnp.asarray(0.3), "lr_head": jnp.asarray(0.5)}


def test_per_layer_values_on_an_equinox_mlp():
    def by_label(lam):
        return hg.optim.per_layer({"body": lam["lr_body"], "head": lam["lr_head"]}, _head_labels)

    def by_path(lam):  # the last layer's path is the longer prefix
        return {"layers": lam["lr_body"], "layers.2": lam["lr_head"]}

    def by_index(lam):
        return hg.optim.per_layer(jnp.stack([lam["lr_body"], lam["lr_head"]]),
                                  {"layers.0": 0, "layers.1": 0, "layers.2": 1})

    runs = {}
    for name, lr in [("label", by_label), ("path", by_path), ("index", by_index)]:
        dyn, objective = _eqx_problem(lr)
        runs[name] = hg.hypergrad(dyn, objective, EQX_LAM, hg.Reverse())
    # the same run, written out weight by weight
    weights = eqx.filter(eqx_classifier()[0], eqx.is_array)

    def full(lam):
        return jax.tree.map(lambda w, label: lam["lr_" + label], weights, _head_labels(weights))

    dyn, objective = _eqx_problem(full)
    reference = hg.hypergrad(dyn, objective, EQX_LAM, hg.Reverse())
    for name, res in runs.items():
        np.testing.assert_allclose(float(res.value), float(reference.value), rtol=1e-13, err_msg=name)
        for k in EQX_LAM:
            np.testing.assert_allclose(float(res.grad[k]), float(reference.grad[k]), rtol=1e-12, err_msg=name)
    f = outer_value(*_eqx_problem(by_label))
    direction = random_direction(EQX_LAM, seed=2)
    np.testing.assert_allclose(tree_dot(runs["label"].grad, direction), central_difference(f, EQX_LAM, direction),
                               rtol=1e-6)
    assert abs(float(runs["label"].grad["lr_head"])) > 1e-6


def test_a_weight_without_a_value_is_named():
    model = eqx.filter(eqx_classifier()[0], eqx.is_array)
    with pytest.raises(ValueError, match=r"'lr': the weight 'layers.2.weight' gets no value"):
        hg.optim.broadcast_to({"layers.0": 0.1, "layers.1": 0.2}, model, "lr")
    with pytest.raises(ValueError, match=r"the weight 'layers.2.weight' has the label 'head', which has no value"):
        hg.optim.broadcast_to(hg.optim.per_layer({"body": 0.1}, _head_labels), model, "lr")
    with pytest.raises(ValueError, match=r"path\(s\) \['layer.0'\] reach no weight"):
        hg.optim.broadcast_to({"layers": 0.1, "layer.0": 0.2}, model, "lr")
    with pytest.raises(ValueError, match=r"no weight has the label\(s\) \[2\]"):
        hg.optim.broadcast_to(hg.optim.per_layer(jnp.ones(3), {"layers.0": 0, "layers.1": 1, "layers.2": 1}),
                              model, "lr")
    with pytest.raises(ValueError, match=r"shape \(3,\) for the weight 'layers.0.weight' of shape \(5, 4\)"):
        hg.optim.broadcast_to(jnp.ones(3), model, "lr")
    dyn, objective = _eqx_problem(lambda lam: {"layers.0": lam["lr_body"]})
    with pytest.raises(ValueError, match=r"the weight 'layers.1.weight' gets no value"):
        dyn.validate(EQX_LAM)


def test_per_layer_values_on_a_nested_dict():
    w = {"conv": {"W": jnp.ones((2, 3)), "b": jnp.ones(3)}, "head": {"out": {"W": jnp.ones((3, 1)), "b": jnp.ones(1)}}}
    got = hg.optim.broadcast_to({"conv": 1.0, "head": 2.0, "head.out.b": 3.0}, w)
    assert got == {"conv": {"W": 1.0, "b": 1.0}, "head": {"out": {"W": 2.0, "b": 3.0}}}
    # a structural prefix reads the same as before
    assert hg.optim.broadcast_to({"conv": 1.0, "head": {"out": {"W": 2.0, "b": 3.0}}}, w) == got
    # an array with one value per label; a per-unit array within a layer
    got = hg.optim.broadcast_to(hg.optim.per_layer(jnp.asarray([1.0, 2.0]), {"conv": 0, "head": 1}), w)
    assert [float(v) for v in jax.tree.leaves(got)] == [1.0, 1.0, 2.0, 2.0]
    got = hg.optim.broadcast_to({"conv": jnp.asarray([1.0, 2.0, 3.0]), "head": 0.5}, w)
    assert got["conv"]["W"].shape == (3,)
    # a list of layers takes a per-layer array as it took list(values)
    layers = [w["conv"], w["head"]["out"]]
    assert hg.optim.broadcast_to(hg.optim.per_layer(jnp.asarray([1.0, 2.0])), layers) == hg.optim.broadcast_to(
        list(jnp.asarray([1.0, 2.0])), layers)


def test_per_layer_array_hypergradient_on_a_nested_dict():
    """One learning rate per label, as one array in λ: its hypergradient has the array's shape."""
    x, y, xv, yv = ridge_data()
    w0 = {"body": {"W": jnp.zeros(x.shape[1])}, "bias": {"b": jnp.zeros(())}}

    def loss(w, lam, batch):
        bx, by = batch
        return jnp.mean((bx @ w["body"]["W"] + w["bias"]["b"] - by) ** 2)

    dyn = hg.Dynamics(init=w0, loss=loss, optimizer=hg.optim.sgd(),
                      optimizer_hparams=lambda lam, t: {"lr": hg.optim.per_layer(lam["lr"], {"body": 0, "bias": 1})},
                      data=(jnp.asarray(x), jnp.asarray(y)), steps=15)
    objective = lambda w, lam: jnp.mean((xv @ w["body"]["W"] + w["bias"]["b"] - yv) ** 2)  # noqa: E731
    lam = {"lr": jnp.asarray([0.05, 0.2])}
    res = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    assert res.grad["lr"].shape == (2,)
    f = outer_value(dyn, objective)
    for i in range(2):
        direction = {"lr": jnp.zeros(2).at[i].set(1.0)}
        np.testing.assert_allclose(float(res.grad["lr"][i]), central_difference(f, lam, direction), rtol=1e-6)


def test_per_layer_values_on_flax_nnx_weights():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.body = nnx.Linear(3, 4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

    _, state = nnx.split(Net(nnx.Rngs(0)))
    got = hg.optim.broadcast_to({"body": 0.1, "head": 0.2, "head.bias": 0.3}, state)
    values = {".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): v
              for path, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    assert values == {"body.bias.value": 0.1, "body.kernel.value": 0.1, "head.bias.value": 0.3,
                      "head.kernel.value": 0.2}


def test_reversible_takes_per_layer_values_by_label():
    """Reversible lays per-layer values out over its flat weights through the same broadcast."""
    dyn, objective, lam = mlp_problem(steps=6, optimizer=hg.optim.momentum(dampen=True))
    by_label = dyn.replace(optimizer_hparams=lambda lam, t: {
        "lr": hg.optim.per_layer(lam["lr"][t], labels=[0, 1]),
        "momentum": {"0": lam["momentum"][t, 0], "1": lam["momentum"][t, 1]}})
    reversible = hg.hypergrad(by_label, objective, lam, hg.Reversible())
    reference = hg.hypergrad(dyn, objective, lam, hg.Reverse())
    for name in ("lr", "momentum"):
        np.testing.assert_allclose(np.asarray(reversible.grad[name]), np.asarray(reference.grad[name]), rtol=1e-6)


def test_per_layer_values_and_an_optax_chain_on_a_flax_nnx_module():
    """An NNX module as init: its weights are an nnx.State, keyed by attribute names."""
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.body = nnx.Linear(4, 5, rngs=rngs, param_dtype=jnp.float64)
            self.head = nnx.Linear(5, 1, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.head(jnp.tanh(self.body(x)))[:, 0]

    rng = np.random.default_rng(1)
    x, y = jnp.asarray(rng.normal(size=(16, 4))), jnp.asarray(rng.normal(size=16))
    xv, yv = jnp.asarray(rng.normal(size=(12, 4))), jnp.asarray(rng.normal(size=12))
    objective = lambda m, lam: jnp.mean((m(xv) - yv) ** 2)  # noqa: E731
    lam = {"lr_body": jnp.asarray(0.2), "lr_head": jnp.asarray(0.4)}
    per_layer = hg.Dynamics(
        init=Net(nnx.Rngs(0)), loss=lambda m, lam, b: jnp.mean((m(b[0]) - b[1]) ** 2), optimizer=hg.optim.momentum(),
        optimizer_hparams=lambda lam, t: {"lr": {"body": lam["lr_body"], "head": lam["lr_head"]}, "momentum": 0.5},
        data=(x, y), steps=6)
    chain = per_layer.replace(
        optimizer=hg.optim.from_optax(optax.chain(optax.clip_by_global_norm(1.0),
                                                  optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))),
        optimizer_hparams=lambda lam, t: {"learning_rate": lam["lr_body"]})
    for dyn in (per_layer, chain):
        res = hg.hypergrad(dyn, objective, lam, hg.Reverse())
        direction = random_direction(lam, seed=4)
        fd = central_difference(lambda l: hg.value_and_grad(dyn, objective, l).value, lam, direction)
        np.testing.assert_allclose(tree_dot(res.grad, direction), fd, rtol=1e-6)
