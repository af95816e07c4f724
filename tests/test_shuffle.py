"""Shuffled Batches: each epoch a keyed permutation, computed at the step's positions only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergradient as hg
from hypergradient.data import FEISTEL_ROUNDS, permutation
from hypergradient.dynamics import train

SIZES = [1, 2, 3, 17, 100, 3001]


def reference(key, n):
    """π of [0, n) as :func:`permutation` defines it, in NumPy: Feistel rounds over the high and
    low h bits of [0, 4^h) with MurmurHash3's finaliser, then cycle walking into [0, n)."""
    half = (int(n - 1).bit_length() + 1) // 2
    mask = (1 << half) - 1
    keys = [int(jax.random.bits(jax.random.fold_in(key, r), (), jnp.uint32)) for r in range(FEISTEL_ROUNDS)]

    def fmix32(h):
        h = ((h ^ (h >> 16)) * 0x85EBCA6B) % 2**32
        h = ((h ^ (h >> 13)) * 0xC2B2AE35) % 2**32
        return h ^ (h >> 16)

    def encrypt(x):
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (fmix32(right ^ k) & mask)
        return (left << half) | right

    out = []
    for x in range(n):
        y = encrypt(x)
        while y >= n:
            y = encrypt(y)
        out.append(y)
    return np.asarray(out)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 100, 1000])
def test_permutation_follows_its_definition(n):
    for seed in (0, 1):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(np.asarray(permutation(key, n, jnp.arange(n))), reference(key, n))


def test_permutation_is_a_bijection_at_any_positions():
    key = jax.random.key(4)
    for n in SIZES:
        picked = np.random.default_rng(n).integers(0, n, 7)
        whole, some = jax.jit(lambda key: (permutation(key, n, jnp.arange(n)), permutation(key, n, picked)))(key)
        np.testing.assert_array_equal(np.sort(whole), np.arange(n))
        np.testing.assert_array_equal(np.asarray(some), np.asarray(whole)[picked])
    with pytest.raises(ValueError, match="n must be"):
        permutation(key, 0, jnp.arange(1))


def test_every_position_is_equally_likely_over_keys():
    """π(0) over 4000 keys, n = 10: each value 400 times in expectation (sd 19); a weak mixing
    (say, π the identity or a rotation) would pile up on a few values."""
    keys = jax.random.split(jax.random.key(0), 4000)
    first = np.asarray(jax.vmap(lambda k: permutation(k, 10, jnp.arange(2)))(keys))
    counts = np.bincount(first[:, 0], minlength=10)
    assert counts.min() > 300 and counts.max() < 500, counts
    pairs = np.bincount(first[:, 0] * 10 + first[:, 1], minlength=100).reshape(10, 10)
    assert np.all(np.diag(pairs) == 0) and pairs[~np.eye(10, dtype=bool)].min() > 15, pairs


@jax.jit
def steps(batches, ts):
    return jax.vmap(batches)(ts)


def epochs(batches, count):
    nb = batches.n_batches
    return list(np.asarray(steps(batches, jnp.arange(count * nb))).reshape(count, -1))


@pytest.mark.parametrize("n, size", [(1, 1), (6, 2), (12, 4), (15, 5), (64, 8), (100, 10)])
def test_each_epoch_visits_every_example_once(n, size):
    batches = hg.Batches(jnp.arange(n), size, key=jax.random.key(7))
    seen = epochs(batches, 3)
    for e in seen:
        np.testing.assert_array_equal(np.sort(e), np.arange(n))
    if n > 2:
        assert not np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[1], seen[2])


def test_a_trailing_partial_batch_is_left_out_and_no_example_repeats():
    n, size = 23, 5  # 4 batches a epoch, 3 examples unused, others each epoch
    batches = hg.Batches(jnp.arange(n), size, key=jax.random.key(2))
    seen = epochs(batches, 4)
    for e in seen:
        assert len(e) == 20 and len(set(e.tolist())) == 20 and set(e.tolist()) <= set(range(n))
    assert len({frozenset(range(n)) - set(e.tolist()) for e in seen}) > 1


def test_the_key_alone_decides_the_order():
    x = jnp.arange(50)
    a, b = hg.Batches(x, 10, key=jax.random.key(3)), hg.Batches(x, 10, key=jax.random.key(3))
    c = hg.Batches(x, 10, key=jax.random.key(4))
    np.testing.assert_array_equal(epochs(a, 2), epochs(b, 2))
    assert not np.array_equal(epochs(a, 1)[0], epochs(c, 1)[0])
    np.testing.assert_array_equal(np.asarray(a(13)), epochs(a, 3)[2][30:40])  # eager, one step


def test_indices_name_the_rows_of_the_batch():
    x = jnp.arange(40.0)[:, None] * 3
    batches = hg.Batches((x, -x), 8, key=jax.random.key(1))
    table = hg.data.Indexed.listed(batches, 12).table
    for t in (0, 4, 11):
        ids = np.asarray(batches.indices(t))
        np.testing.assert_array_equal(np.asarray(batches(t)[0])[:, 0], np.asarray(x)[ids, 0])
        (bx, _), ids2 = batches.indexed(t)
        np.testing.assert_array_equal(np.asarray(ids2), ids)
        np.testing.assert_array_equal(np.asarray(bx), np.asarray(batches(t)[0]))
        np.testing.assert_array_equal(np.asarray(table[t]), ids)


def test_a_shuffled_run_differentiates_like_the_same_batches_given_as_a_table():
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(30, 3))), jnp.asarray(rng.normal(size=30))
    batches = hg.Batches((x, y), 6, key=jax.random.key(5))
    ids = np.stack([np.asarray(batches.indices(t)) for t in range(12)])
    table = jax.tree_util.Partial(lambda ids, t: (x[ids[t]], y[ids[t]]), jnp.asarray(ids))

    def final_loss(data, lr):
        dyn = hg.Dynamics(init=jnp.zeros(3), loss=lambda w, lam, b: jnp.mean((b[0] @ w - b[1]) ** 2),
                          optimizer=hg.optim.sgd(), optimizer_hparams=lambda lam, t: {"lr": lam}, data=data, steps=12)
        return jnp.sum(train(dyn, lr)[1])

    a = jax.value_and_grad(final_loss, argnums=1)(batches, jnp.asarray(0.1))
    b = jax.value_and_grad(final_loss, argnums=1)(table, jnp.asarray(0.1))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)
