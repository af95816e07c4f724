"""Step-indexed, deterministic minibatches.

A training run asks for the batch of step ``t`` inside ``jit`` (and again on
the backward pass), so batches are a pure function of ``t``: no iterator
state, no host round trip.

Whatever ``Dynamics(data=...)`` is given becomes one :class:`Data`, once, by :func:`as_data`:
:class:`Batches` as it is, any other callable a :class:`Steps`, anything else (``None`` too) a
:class:`Fixed` batch. Each is a pytree (its arrays are leaves, functions static) called as
``data(t) -> batch``; those that know every training example offer them as ``examples``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Literal
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._checks import check_int


def shard(tree: Any, mesh: Mesh, axis: str = "data", process_local: bool = False) -> Any:
    """Every array of ``tree`` sharded along its leading axis over the mesh axis ``axis``.

    With D devices on ``axis``, device d holds the d-th contiguous block of n/D rows (replicated
    over the mesh's other axes). ``process_local=True``: each process passes only its own
    contiguous share (the rows of its devices' blocks) and the global array is assembled without
    any process holding all of it (``jax.make_array_from_process_local_data``).
    """
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    size = mesh.shape[axis]

    def put(a):
        a = np.asarray(a)
        if process_local:
            return jax.make_array_from_process_local_data(sharding, a)
        if a.ndim == 0 or a.shape[0] % size:
            raise ValueError(f"shard: a leading axis of {a.shape[0] if a.ndim else 'no'} rows does not split into "
                             f"{size} equal blocks over the mesh axis {axis!r}")
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(put, tree)


def _check_shares(arrays: Any) -> None:
    """Refuse ``process_local=True`` where every process passed the same rows: the whole arrays,
    which would make a global set of P copies and train on the wrong rows, silently.

    The processes compare a fingerprint of their shares (shape, first and last rows), one small
    all-gather when the batches are built."""
    processes = jax.process_count()
    if processes == 1:
        return
    from jax.experimental import multihost_utils

    leaves = [np.asarray(a) for a in jax.tree.leaves(arrays)]
    digest = 0
    for a in leaves:
        for part in (repr(a.shape).encode(), a[:1].tobytes(), a[-1:].tobytes()):
            digest = zlib.crc32(part, digest)
    digests = np.asarray(multihost_utils.process_allgather(np.asarray([digest], np.int64))).reshape(-1)
    if len(set(digests.tolist())) == 1:
        rows = leaves[0].shape[0]
        raise ValueError(
            f"Batches: process_local=True, and all {processes} processes passed the same {rows} rows: with "
            "process_local each passes only its own share (process i the rows [i·n_local, (i+1)·n_local), "
            f"n_local = n / {processes} with one device each), or pass the whole arrays with process_local=False")


class Data:
    """Where the batch of step ``t`` comes from: ``data(t) -> batch``, traceable in ``t``.

    ``given`` is what ``Dynamics(data=...)`` was given. A source that knows every training
    example offers them as one batch, ``examples`` (what :class:`~hypergradient.Implicit` states
    stationarity on and what is checked for NaN); one that does not has no such attribute.
    """

    def __call__(self, t) -> Any:
        raise NotImplementedError

    @property
    def given(self) -> Any:
        return self

    def check(self) -> None:
        """Raise ``ValueError`` if ``data(t)`` cannot give each step its own batch (a source built
        for it, a fixed batch or :class:`Batches`, always can)."""

    def indices(self, t) -> jax.Array:
        """The ids (rows of ``examples``) of the examples in the batch of step ``t``, in the batch's
        order; a source that does not know its examples raises ``TypeError``."""
        raise TypeError(
            f"data given as {type(self.given).__name__} does not say which training examples a batch holds: "
            "give hg.Batches((x, y), batch_size) or a fixed batch for per-example weights")

    def indexed(self, t) -> tuple[Any, jax.Array]:
        """``(self(t), self.indices(t))``: the batch of step ``t`` and its examples' ids."""
        return self(t), self.indices(t)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["batch"], meta_fields=[])
@dataclasses.dataclass(frozen=True, eq=False)
class Fixed(Data):
    """Full-batch training: the same ``batch`` at every step (``None`` too: ``loss`` receives it)."""

    batch: Any

    def __call__(self, t) -> Any:
        return self.batch

    @property
    def given(self) -> Any:
        return self.batch

    @property
    def examples(self) -> Any:
        return self.batch

    @property
    def size(self) -> int:
        """The number of examples, the leading dimension the batch's arrays share."""
        sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(self.batch)}
        if len(sizes) != 1 or None in sizes:
            raise TypeError("the fixed batch's arrays do not share a leading (example) dimension "
                            f"(shapes {[jnp.shape(a) for a in jax.tree.leaves(self.batch)]}), so its examples "
                            "cannot be weighted one by one")
        return sizes.pop()

    def indices(self, t) -> jax.Array:
        return jnp.arange(self.size)


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["fn"])
@dataclasses.dataclass(frozen=True)
class Steps(Data):
    """Any traceable ``fn(t) -> batch``, held static: it is part of the compiled program. Which
    examples it draws from is its own affair, so it offers no ``examples``."""

    fn: Callable[[Any], Any]

    def __call__(self, t) -> Any:
        return self.fn(t)

    @property
    def given(self) -> Any:
        return self.fn

    def check(self) -> None:
        """Raise ``ValueError`` unless ``fn`` is a pure function of ``t`` that depends on it.

        ``fn`` runs when the training program is traced, not at every step, so whatever it reads
        on the host then (``next(iterator)``, a NumPy random draw) becomes a constant of every
        step. Two traces at an abstract ``t`` tell: constants that differ between them are such
        a read; outputs that no operation on ``t`` reaches are the same batch at every step.
        """
        t = jax.ShapeDtypeStruct((), jnp.int32)
        first, second = _trace(self.fn, t), _trace(self.fn, t)
        if not _same_program(first, second):
            raise ValueError(
                "data: two traces of data(t) gave different batches, so it reads host state when traced "
                "(next() of an iterator, a host-side random generator) and every step would train on what one "
                "read returned; a host-side iterator cannot be replayed: data must be a pure function of t "
                "(index your dataset by t, e.g. with hg.Batches, and draw randomness from "
                "jax.random.fold_in(key, t))"
            )
        outputs = first.jaxpr.outvars
        if outputs and not _reaches(first.jaxpr, outputs):
            raise ValueError(
                "data: data(t) does not depend on t, so it gives the same batch at every step: pass the batch "
                "itself as data=batch for full-batch training, or index your dataset by t (e.g. with hg.Batches "
                "or jax.lax.dynamic_slice)"
            )


def _trace(fn: Callable[[Any], Any], t) -> ClosedJaxpr:
    try:
        return jax.make_jaxpr(lambda t: fn(t))(t)  # a new function: make_jaxpr caches by function
    except StopIteration as e:  # would end a caller's loop, far from here, without a word
        raise ValueError(
            "data: data(t) raised StopIteration: a host-side iterator cannot be replayed (it is read once, when "
            "the training program is traced); data must be a pure function of t, e.g. hg.Batches"
        ) from e


# JAX prints objects as <... at 0xXXXXXXXXXXXX>; should one slip through, a fresh address is no change
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _same_program(a, b) -> bool:
    """Whether two traces of one function are the same program: the same operations and literals
    (printed) and equal constants."""
    if _ADDRESS.sub("", str(a.jaxpr)) != _ADDRESS.sub("", str(b.jaxpr)) or len(a.consts) != len(b.consts):
        return False
    return all(map(_same_constant, a.consts, b.consts))


def _same_constant(a, b) -> bool:
    if a is b:  # arrays closed over: the same object at every trace, nothing to read back
        return True
    if not (hasattr(a, "dtype") and hasattr(b, "dtype")):
        return type(a) is type(b) and bool(np.all(a == b))
    if jnp.shape(a) != jnp.shape(b) or a.dtype != b.dtype:
        return False
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        return True  # an outer trace's value: not readable, and the same shape
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
    if any(isinstance(c, jax.Array) and not c.is_fully_addressable for c in (a, b)):
        return True  # held by several processes: not readable here, and the same shape
    a, b = np.asarray(a), np.asarray(b)
    return bool(np.array_equal(a, b, equal_nan=bool(np.issubdtype(a.dtype, np.inexact))))


def _reaches(jaxpr, outputs) -> bool:
    """Whether any of ``outputs`` is computed from the jaxpr's inputs (an operation that takes a
    reached value reaches all it returns: inner jaxprs are not opened, which errs towards yes)."""
    reached = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, Literal) and v in reached for v in eqn.invars):
            reached.update(eqn.outvars)
    return any(not isinstance(v, Literal) and v in reached for v in outputs)


def as_data(data: Any) -> Data:
    """``data`` as a :class:`Data`: a :class:`Batches` itself, another callable a :class:`Steps`,
    anything else (a pytree of arrays, ``None``) a :class:`Fixed` batch. An iterator is refused:
    it cannot be replayed step by step."""
    if isinstance(data, Data):
        return data
    if isinstance(data, Iterator):
        raise TypeError(
            f"data is an iterator ({type(data).__name__}): a host-side iterator cannot be replayed inside the "
            "compiled training run; data must be a pure function of t (index your dataset by t, e.g. with "
            "hg.Batches) or a fixed batch"
        )
    return Steps(data) if callable(data) else Fixed(data)


@jax.tree_util.register_pytree_node_class
class Batches(Data):
    """Minibatches of ``arrays`` indexed by training step.

    Step ``t`` belongs to epoch ``e = t // n_batches`` and takes batch
    ``i = t mod n_batches`` of that epoch, where ``n_batches = n // batch_size``
    (a trailing partial batch is never used). Without a ``key`` the order is
    the data's own: batch ``i`` is ``arrays[i*batch_size : (i+1)*batch_size]``.
    With a ``key`` every epoch is a fresh permutation π_e of the examples,
    keyed by ``fold_in(key, e)`` and reproducible for any ``t``: batch ``i``
    is examples π_e(i*batch_size), ..., π_e((i+1)*batch_size − 1), each
    computed on its own (:func:`permutation`), so a step costs O(batch_size),
    not a shuffle of all n.

    Data parallel, with a ``mesh``: the D devices on the mesh axis ``axis`` each hold a
    contiguous block of n/D examples (see :func:`shard`), and step t's global batch is, for each
    d in order, rows [i·b/D, (i+1)·b/D) of block d, with i = t mod nb and nb = (n/D) // (b/D).
    With a key, each block is permuted per epoch on its own device (from ``fold_in(fold_in(key,
    e), d)``). No step moves examples between devices: the gradient's all-reduce is the only
    communication of a training step.

    Args:
      arrays: a pytree of arrays sharing their leading dimension ``n``
        (for example ``(x, y)``).
      batch_size: examples per step, ``1 <= batch_size <= n`` (with a mesh, a multiple of D).
      key: optional ``jax.random`` key for per-epoch shuffling.
      mesh: a ``jax.sharding.Mesh`` to spread the examples over (``None``: one device).
      axis: the mesh axis the examples are split along.
      process_local: with several processes, each passes only its own contiguous share of
        ``arrays`` (its devices' blocks); ``n`` is then the global count.
    """

    def __init__(self, arrays: Any, batch_size: int, key: jax.Array | None = None, mesh: Mesh | None = None,
                 axis: str = "data", process_local: bool = False):
        leaves = jax.tree.leaves(arrays)
        if not leaves:
            raise ValueError("Batches needs at least one array")
        sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in leaves}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                "Batches: every array needs the same leading (example) dimension; got shapes "
                f"{[jnp.shape(a) for a in leaves]}"
            )
        if process_local and mesh is None:
            raise ValueError("Batches: process_local=True needs a mesh (each process passes its share of it)")
        if mesh is not None:
            if axis not in mesh.shape:
                raise ValueError(f"Batches: the mesh has no axis {axis!r} (its axes: {tuple(mesh.shape)})")
            if process_local:
                _check_shares(arrays)
            arrays = shard(arrays, mesh, axis, process_local)
        else:
            arrays = jax.tree.map(jnp.asarray, arrays)
        n = jax.tree.leaves(arrays)[0].shape[0]
        devices = 1 if mesh is None else mesh.shape[axis]
        batch_size = check_int("Batches: batch_size", batch_size)
        if batch_size > n:
            raise ValueError(f"Batches: batch_size must be at most n = {n} examples, got {batch_size}")
        if batch_size % devices or n % devices:
            raise ValueError(
                f"Batches: {devices} devices on mesh axis {axis!r} need n ({n}) and batch_size ({batch_size}) "
                "to be multiples of it"
            )
        self.arrays = arrays
        self.batch_size = batch_size
        self.key = key
        self.mesh = mesh
        self.axis = axis

    @property
    def size(self) -> int:
        return jax.tree.leaves(self.arrays)[0].shape[0]

    @property
    def examples(self) -> Any:
        """Every example, the arrays the batches are cut from."""
        return self.arrays

    @property
    def devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape[self.axis]

    @property
    def n_batches(self) -> int:
        return (self.size // self.devices) // (self.batch_size // self.devices)

    def __call__(self, t) -> Any:
        if self.mesh is None:
            return _batch(self.arrays, t, self.key, self.batch_size, self.n_batches, None)
        spec = PartitionSpec(self.axis)
        take = functools.partial(_batch, size=self.batch_size // self.devices, n_batches=self.n_batches,
                                 axis=self.axis)
        if self.key is None:
            return jax.shard_map(lambda a, t: take(a, t, None), mesh=self.mesh, in_specs=(spec, PartitionSpec()),
                                 out_specs=spec)(self.arrays, t)
        return jax.shard_map(lambda a, t, key: take(a, t, key), mesh=self.mesh,
                             in_specs=(spec, PartitionSpec(), PartitionSpec()), out_specs=spec)(self.arrays, t, self.key)

    def indices(self, t) -> jax.Array:
        """The ids of step ``t``'s examples: the rows of ``arrays`` that ``self(t)`` takes, in its order
        (sharded like the batch when there is a mesh)."""
        if self.mesh is None:
            return _batch(jnp.arange(self.size), t, self.key, self.batch_size, self.n_batches, None)
        block = self.size // self.devices

        def take(t, key):
            ids = jax.lax.axis_index(self.axis) * block + jnp.arange(block)
            return _batch(ids, t, key, self.batch_size // self.devices, self.n_batches, self.axis)

        if self.key is None:
            return jax.shard_map(lambda t: take(t, None), mesh=self.mesh, in_specs=(PartitionSpec(),),
                                 out_specs=PartitionSpec(self.axis))(t)
        return jax.shard_map(take, mesh=self.mesh, in_specs=(PartitionSpec(), PartitionSpec()),
                             out_specs=PartitionSpec(self.axis))(t, self.key)

    def indexed(self, t) -> tuple[Any, jax.Array]:
        """The batch of step ``t`` and its ids, the rows gathered by the ids on one device (one
        permutation per step, not two)."""
        if self.mesh is None and self.key is not None:
            ids = self.indices(t)
            return jax.tree.map(lambda a: jnp.take(a, ids, axis=0), self.arrays), ids
        return super().indexed(t)

    def tree_flatten(self):
        return (self.arrays, self.key), (self.batch_size, self.mesh, self.axis)

    @classmethod
    def tree_unflatten(cls, static, children):
        obj = object.__new__(cls)
        obj.arrays, obj.key = children
        obj.batch_size, obj.mesh, obj.axis = static
        return obj

    def __repr__(self) -> str:
        spread = "" if self.mesh is None else f", devices={self.devices}"
        return f"Batches(n={self.size}, batch_size={self.batch_size}, shuffled={self.key is not None}{spread})"


def _batch(arrays, t, key, size: int, n_batches: int, axis: str | None):
    """Batch ``t mod n_batches`` of ``size`` rows of ``arrays`` (one device's block when ``axis``
    names the mesh axis being mapped over), in a per-epoch permutation when ``key`` is given."""
    epoch, i = jnp.divmod(t, n_batches)
    start = i * size
    if key is None:
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=0), arrays)
    key = jax.random.fold_in(key, epoch)
    if axis is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis))
    n = jax.tree.leaves(arrays)[0].shape[0]
    idx = permutation(key, n, start + jnp.arange(size))
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), arrays)


FEISTEL_ROUNDS = 6


def permutation(key: jax.Array, n: int, positions: jax.Array) -> jax.Array:
    """π(positions) for a pseudorandom permutation π of [0, n) keyed by ``key``, computed at the
    given positions only: O(len(positions)) work, not the O(n log n) of drawing all of π.

    With m = bit_length(n − 1) and h = ⌈m/2⌉, E is a balanced Feistel network on [0, 4^h) ⊇
    [0, n): x = (L, R), its high and low h bits, and each of ``FEISTEL_ROUNDS`` rounds r maps
    (L, R) ↦ (R, L ⊕ F_r(R)), with F_r(R) = fmix32(R ⊕ K_r) mod 2^h (MurmurHash3's finaliser),
    K_r = ``jax.random.bits(fold_in(key, r))``. Each round is invertible whatever F_r, so E is a
    permutation of [0, 4^h); π(x) is the first of E(x), E(E(x)), … that falls in [0, n) (cycle
    walking: x's cycle under E returns to x, so the walk ends, and it is a bijection of [0, n)).
    Since 4^h < 4n, a walk takes fewer than 4 steps on average. Integers only: nothing here is
    differentiated.
    """
    if not 1 <= n < 2**31:
        raise ValueError(f"permutation: n must be in [1, 2^31), got {n}")
    half = -(-(n - 1).bit_length() // 2)
    mask = np.uint32((1 << half) - 1)
    keys = [jax.random.bits(jax.random.fold_in(key, r), (), jnp.uint32) for r in range(FEISTEL_ROUNDS)]

    def encrypt(x):
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_fmix32(right ^ k) & mask)
        return (left << half) | right

    y = encrypt(jnp.asarray(positions).astype(jnp.uint32))
    y = jax.lax.while_loop(lambda y: jnp.any(y >= n), lambda y: jnp.where(y >= n, encrypt(y), y), y)
    return y.astype(jnp.int32)


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 in which every input bit flips each
    output bit with probability close to 1/2."""
    h = (h ^ (h >> 16)) * np.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


@jax.jit
def _ids_table(source: Data, steps: jax.Array) -> jax.Array:
    """Row t: the ids of step ``steps[t]``'s batch (compiled once per source's structure)."""
    return jax.vmap(source.indices)(steps)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["source", "table"], meta_fields=[])
@dataclasses.dataclass(frozen=True, eq=False)
class Indexed(Data):
    """``source``'s batches with their examples' ids: step ``t`` gives ``(source(t),
    source.indices(t))``, what a loss needs to find each example's weight.

    With ``table`` (``(T, b)``: row t the ids of step t, from :meth:`listed`) a step reads its ids
    from it and gathers its rows: no permutation is drawn inside the run, nor recomputed on a
    backward pass.
    """

    source: Data
    table: jax.Array | None = None

    @classmethod
    def listed(cls, source: Data, steps: int) -> Indexed:
        """``source`` indexed by a table of its first ``steps`` batches' ids, where that saves work
        (shuffled :class:`Batches` on one device: T·b integers); plainly indexed otherwise."""
        if not (isinstance(source, Batches) and source.mesh is None and source.key is not None):
            return cls(source)
        return cls(source, _ids_table(source, jnp.arange(steps)))

    def __call__(self, t) -> Any:
        if self.table is None:
            return self.source.indexed(t)
        ids = self.table[t]
        return jax.tree.map(lambda a: jnp.take(a, ids, axis=0), self.source.examples), ids

    @property
    def size(self) -> int:
        return self.source.size

    @property
    def examples(self) -> Any:
        return self.source.examples, jnp.arange(self.source.size)

    def check(self) -> None:
        self.source.check()
