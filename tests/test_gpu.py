"""On accelerators: full-precision products by default (checked on every backend, in the program
JAX lowers), and, where a GPU is present, B1-sized runs that reverse exactly and agree with CPU.

The coder's integer division is checked on every backend by ``test_fixedpoint.py``.
"""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergradient as hg
from hypergradient.apps import models
from hypergradient.hypergrad import compiled
from problems import mlp_problem

jax.config.update("jax_enable_x64", True)

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def dot_precisions(dyn, objective, lam, method):
    text = jax.jit(lambda lam: hg.value_and_grad(dyn, objective, lam, method)).lower(lam).as_text()
    return [line.split("precision = ")[1].split("]")[0] + "]" for line in text.splitlines() if "dot_general" in line]


METHODS = [hg.Reverse(), hg.Reverse(checkpoint_every=3), hg.Forward(), hg.Truncated(3), hg.DrMAD(), hg.Reversible()]


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_products_run_at_full_precision_by_default(method):
    dyn, objective, lam = mlp_problem(steps=6)
    precisions = dot_precisions(dyn, objective, lam, method)
    assert precisions and set(precisions) == {"[HIGHEST, HIGHEST]"}


def test_plain_training_and_the_online_loop_trace_at_full_precision_too():
    """The loss records the product precision in force whenever the library traces it."""
    seen = []
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32), jnp.asarray(rng.normal(size=16), jnp.float32)

    def loss(w, lam, batch):
        seen.append(jax.config.jax_default_matmul_precision)
        bx, by = batch
        return jnp.mean((bx @ w - by) ** 2) + jnp.exp(lam["log_l2"]) * jnp.sum(w**2)

    dyn = hg.Dynamics(init=jnp.zeros(3, jnp.float32), loss=loss, optimizer=hg.optim.sgd(),
                      optimizer_hparams=lambda lam, t: {"lr": 0.1}, data=hg.Batches((x, y), 4, key=jax.random.PRNGKey(0)),
                      steps=8)
    lam = {"log_l2": jnp.asarray(-2.0, jnp.float32)}
    dyn.run(lam)
    assert seen and set(seen) == {"highest"}
    seen.clear()
    hg.online(dyn, lambda w, lam: jnp.mean((x @ w - y) ** 2), lam, method=hg.Forward(), every=4, progress=False)
    assert seen and set(seen) == {"highest"}


def test_jax_own_setting_chooses_faster_products_and_a_program_of_its_own():
    dyn, objective, lam = mlp_problem(steps=6)
    exact = hg.hypergrad(dyn, objective, lam)
    with jax.default_matmul_precision("tensorfloat32"):
        assert set(dot_precisions(dyn, objective, lam, hg.Reverse())) == {"[HIGH, HIGH]"}
        fast = hg.hypergrad(dyn, objective, lam)
        assert fast.stats["compile_seconds"] > 0  # not the full-precision program from the cache
        _, seconds, _ = compiled(dyn, objective, hg.Reverse(), lam)
        assert seconds == 0.0
    if jax.default_backend() == "cpu":  # CPU products are full precision whatever the setting
        for a, b in zip(jax.tree.leaves(exact.grad), jax.tree.leaves(fast.grad)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def b1_sized(steps=100, seed=0):
    """B1's shapes and recurrence in float32 (MLP 784-50-50-50-10, per-step per-layer lr and μ,
    dampened momentum, batches of 200) on seeded random data: no dataset needed."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(0, 1, (2000, 784)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 2000), jnp.int32)
    xv, yv = x[:1000] + 0.01, y[:1000]
    w0 = models.mlp_init(jax.random.PRNGKey(seed), (784, 50, 50, 50, 10))

    def loss(w, lam, batch):
        bx, by = batch
        return models.cross_entropy(models.mlp_apply(w, bx), by) + models.l2_penalty(w, jnp.exp(lam["log_l2"]))

    dyn = hg.Dynamics(
        init=w0,
        loss=loss,
        optimizer=hg.optim.momentum(dampen=True),
        optimizer_hparams=lambda lam, t: {"lr": list(lam["lr"][t]), "momentum": list(lam["momentum"][t])},
        data=hg.Batches((x, y), 200),
        steps=steps,
    )
    lam = {
        "log_l2": jnp.full(4, -8.0, jnp.float32),
        "lr": jnp.full((steps, 4), 0.5, jnp.float32),
        "momentum": jnp.full((steps, 4), 0.9, jnp.float32),
    }
    objective = jax.tree_util.Partial(lambda xv, yv, w, lam: models.cross_entropy(models.mlp_apply(w, xv), yv), xv, yv)
    return dyn, objective, lam


def cosine(a, b):
    a, b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]), np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@on_gpu
def test_b1_sized_float32_run_reverses_bit_for_bit_on_the_gpu():
    dyn, objective, lam = b1_sized()
    res = hg.hypergrad(dyn, objective, lam, hg.Reversible())  # raises ReversalError naming the cause
    assert res.stats["exact_reversal"] == 1.0
    assert cosine(res.grad, hg.hypergrad(dyn, objective, lam, hg.Reverse()).grad) > 0.999


@on_gpu
def test_b1_sized_hypergradient_on_the_gpu_agrees_with_the_cpu():
    dyn, objective, lam = b1_sized()
    gpu = hg.hypergrad(dyn, objective, lam)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        ref = hg.hypergrad(*jax.device_put((dyn, objective, lam), cpu))
    for a, b in zip(jax.tree.leaves(gpu.grad), jax.tree.leaves(ref.grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))


@pytest.mark.end_to_end
def test_the_gpu_benchmark_runs_its_plumbing_on_cpu(tmp_path):
    """benchmarks.gpu, as gpu.sh --cpu-dry-run runs it (ours only, T = 3): every method gets a row."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", str(tmp_path), "--device", "cpu",
                           "--steps", "3", "--repeats", "1", "--digits", "--no-torch"],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "b1_gpu.md").read_text()
    for name in ("Reverse", "Reverse(checkpoint_every=10)", "Truncated(10)", "Forward (4 per-layer lrs)", "Reversible"):
        assert f"| ours: {name} | " in table
