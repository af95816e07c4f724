"""The byte-level transformer language model: jax.nn.dot_product_attention (XLA) equal to a masked
softmax written out, in value and in a jvp of its gradient; the model's second derivatives equal
to central differences of its gradient (float64); the text loading; and its tuning problem's
hypergradient, forward-over-reverse, equal to central differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypergradient as hg
from hypergradient.apps import lm, text, transformer
from problems import central_difference, outer_value, random_direction, tree_dot

D, HEADS, CONTEXT = 8, 2, 6


@functools.cache
def _model():
    w = transformer.transformer_init(jax.random.PRNGKey(0), 256, D, HEADS, 1, CONTEXT, jnp.float64)
    windows = jax.random.randint(jax.random.PRNGKey(1), (3, CONTEXT + 1), 0, 256)
    return w, windows


def _attention_written_out(q, k, v):
    length, d = q.shape[1], q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    scores = jnp.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def test_xla_attention_is_causal_masked_softmax_to_second_order():
    """In float32 (its softmax is float32 whatever the input) against float64 written out: values,
    and a jvp of the gradient of a scalar of them (what forward-over-reverse takes)."""
    q, k, v = jax.random.normal(jax.random.PRNGKey(2), (3, 2, 5, HEADS, 4), jnp.float64)
    t = jax.random.normal(jax.random.PRNGKey(3), (3, 2, 5, HEADS, 4), jnp.float64)

    def second(attention, dtype):
        f = lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)))  # noqa: E731
        g = lambda *a: jax.grad(f, argnums=(0, 1, 2))(*a)  # noqa: E731
        args = tuple(a.astype(dtype) for a in (q, k, v))
        return jax.jit(lambda a, t: (attention(*a), jax.jvp(g, a, t)[1]))(args, tuple(a.astype(dtype) for a in t))

    xla = second(transformer.causal_attention, jnp.float32)
    exact = second(_attention_written_out, jnp.float64)
    for a, b in zip(jax.tree.leaves(xla), jax.tree.leaves(exact), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(transformer.causal_attention(q, k, v), exact[0], rtol=1e-13, atol=1e-13)


def test_logits_depend_only_on_earlier_tokens():
    w, windows = _model()
    tokens = windows[:, :-1]
    changed = tokens.at[:, 3:].set((tokens[:, 3:] + 7) % 256)
    apply = jax.jit(transformer.transformer_apply, static_argnums=2)
    a, b = apply(w, tokens, HEADS), apply(w, changed, HEADS)
    np.testing.assert_allclose(a[:, :3], b[:, :3], rtol=1e-12)
    assert float(jnp.max(jnp.abs(a[:, 3:] - b[:, 3:]))) > 1e-3


@pytest.mark.slow
def test_second_derivative_matches_central_differences():
    """jvp of grad (forward-over-reverse) and grad of grad·v (reverse-over-reverse) of the loss
    both equal (∇L(w + εv) − ∇L(w − εv)) / 2ε."""
    w, windows = _model()
    loss = lambda w: transformer.lm_loss(w, windows, heads=HEADS)  # noqa: E731
    v = random_direction(w, seed=3)
    fwd = jax.jit(lambda w: jax.jvp(jax.grad(loss), (w,), (v,))[1])(w)
    rev = jax.jit(jax.grad(lambda w: tree_dot_traced(jax.grad(loss)(w), v)))(w)
    u = random_direction(w, seed=4)
    fd = central_difference(jax.jit(lambda w: tree_dot_traced(jax.grad(loss)(w), u)), w, v, eps=1e-5)
    assert tree_dot(fwd, u) == pytest.approx(fd, rel=1e-6)
    assert tree_dot(rev, u) == pytest.approx(fd, rel=1e-6)


def tree_dot_traced(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_folder_sources_and_windows(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_bytes(bytes(range(40)))
    (tmp_path / "b" / "y.txt").write_bytes(bytes(range(40, 60)))
    (tmp_path / "a.txt").write_bytes(b"z" * 30)
    sources = text.folder_sources(tmp_path)
    assert list(sources) == ["a.txt", "b"] and sources["b"] == bytes(range(60))
    (train, train_source), (val, val_source) = text.windows(sources, 5, val_fraction=0.5)
    assert train.shape == (3 + 6, 5) and val.shape == (3 + 6, 5)
    np.testing.assert_array_equal(train_source, [0] * 3 + [1] * 6)
    np.testing.assert_array_equal(val[3], np.arange(30, 35))  # b's second half, contiguous
    with pytest.raises(FileNotFoundError, match="no source"):
        text.folder_sources(tmp_path, ["missing"])


def test_stdlib_sources_are_python_source():
    sources = text.stdlib_sources(max_bytes=1000)
    assert list(sources) == list(text.STDLIB_PACKAGES)
    assert all(len(s) == 1000 for s in sources.values()) and b"import" in sources["json"]
    assert text.python_version().count(".") == 2


@functools.cache
def _lm_problem():
    sources = text.stdlib_sources(max_bytes=4000)
    train, val = text.windows(sources, CONTEXT + 1)
    return lm.problem(train, (val[0][:8], val[1][:8]), len(sources), steps=2, batch_size=4, val_chunk=3,
                      d_model=D, heads=HEADS, layers=1, dtype=jnp.float64)


@pytest.mark.slow
def test_lm_hypergradient_forward_over_reverse_matches_differences():
    """Schedule peak, AdamW's weight decay and the source weights (validation windows in chunks of 3),
    through the transformer's Hessian products taken forward-over-reverse (reverse-over-reverse
    equals it: tests/test_second_order.py)."""
    dyn, objective, lam = _lm_problem()
    lam = {**lam, "source_logits": jnp.array([0.3, -0.2, 0.1, 0.0])}
    sol = jax.jit(lambda l: hg.value_and_grad(dyn, objective, l, hg.Reverse(second_order="forward")))(lam)
    v = random_direction(lam, seed=5)
    fd = central_difference(jax.jit(outer_value(dyn, objective)), lam, v)
    # the difference's own error is about 1e-6 here: its h² term is 6e-3 of the slope at h = 1e-4, so
    # 6e-7 at 1e-6, and rounding f (about 5) costs 1e-10 of a slope of 1e-4 (equality with
    # reverse-over-reverse, to 1e-10, is tests/test_second_order.py's)
    assert tree_dot(sol.grad, v) == pytest.approx(fd, rel=5e-6)
