"""Atomic, structure-checked checkpoints of a driver's state, written by orbax-checkpoint.

A checkpoint is a directory that orbax's ``CheckpointManager`` manages: one step folder per save,
holding named pytrees (their leaves as arrays) and a JSON header. Orbax writes a step to a
temporary folder and renames it when complete, and the previous step is deleted only after that,
so a process killed at any moment (SIGKILL included) leaves the previous checkpoint or the new
one, never a torn one. Arrays sharded over devices or processes are written by the processes
that hold them; every process of a multi-process run calls :func:`save`.

Pytrees are restored against a *template* (the tree a fresh run would build): the stored tree
structure, shapes and dtypes must match it exactly, otherwise
:class:`CheckpointMismatchError` says what differs. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import CheckpointMismatchError

FORMAT = 2

#: The offline drivers write a checkpoint when a hyper-step ends this long after the last write, at
#: the last hyper-step, and when the run is interrupted or fails: a SIGKILL loses at most these
#: seconds of work, and short hyper-steps do not pay a write each.
CHECKPOINT_SECONDS = 2.0


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def _storable(x: Any) -> Any:
    """A leaf as it is written: a typed PRNG key (an NNX module's RNG stream) as its key data."""
    if not _is_key(x):
        return x
    return jax.eval_shape(jax.random.key_data, x) if isinstance(x, jax.ShapeDtypeStruct) else jax.random.key_data(x)


def spec(tree: Any) -> dict:
    """A JSON-able description of a pytree: structure, shapes and dtypes of its leaves (a key's as
    its key data's)."""
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [_storable(x) for x in leaves]
    return {
        "treedef": str(treedef),
        "shapes": [list(np.shape(x)) for x in leaves],
        "dtypes": [str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype) for x in leaves],
    }


class Periodic:
    """When an offline driver writes its checkpoint: after a hyper-step that ends
    :data:`CHECKPOINT_SECONDS` after the last write, after the last hyper-step, and when the run
    stops on an exception (Ctrl-C, a divergence), so that every finished hyper-step is kept.

        with Periodic(path, write, start) as saving:   # write(step) saves the driver's state
            for k in ...:
                ...
                saving.done(k + 1, last=k + 1 == total)
    """

    def __init__(self, path: str | None, write, start: int):
        self.path, self.write = path, write
        self.saved = self.finished = start
        self.last = time.monotonic()

    def done(self, step: int, last: bool = False) -> None:
        """Hyper-steps up to ``step`` are finished."""
        self.finished = step
        if self.path is not None and (last or time.monotonic() - self.last >= CHECKPOINT_SECONDS):
            self._write()

    def _write(self):
        self.write(self.finished)
        self.saved, self.last = self.finished, time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is not None and self.path is not None and self.finished > self.saved:
            self._write()
        return False


@contextlib.contextmanager
def sigint_held():
    """Run the block whole: a Ctrl-C (SIGINT) that arrives in it is raised as ``KeyboardInterrupt``
    when it ends. A driver moves its state to the next hyper-step in such a block, so that the
    checkpoint written on the way out never holds half of an update (λ_{k+1} with the count of
    step k). Only where Python's own handler is in force, in the main thread."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def _manager(path: str):
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every save at INFO
    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(os.path.abspath(path), options=options, item_names=("arrays", "meta"))


def save(path: str | os.PathLike, trees: Mapping[str, Any], header: Mapping[str, Any]) -> None:
    """Write ``trees`` (name -> pytree) and a JSON ``header`` as the newest step of the checkpoint
    directory ``path``, atomically; the header's ``step`` numbers it."""
    import orbax.checkpoint as ocp

    path = os.fspath(path)
    arrays: dict[str, list] = {}
    specs = {}
    for name, tree in trees.items():
        leaves = [_storable(x) for x in jax.tree.leaves(tree)]
        specs[name] = spec(tree)
        if isinstance(tree, Mapping):
            specs[name]["keys"] = sorted(tree)  # the order in which a dict flattens
        # an array spread over several processes is written by them all; anything else, from the host
        arrays[name] = {str(i): leaf if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
                        else np.asarray(leaf) for i, leaf in enumerate(leaves) if np.size(leaf)}  # empty: the spec says it all
    meta = {"format": FORMAT, "header": dict(header), "trees": specs}
    step = int(header.get("step", 0))
    manager = _manager(path)
    try:
        manager.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
                     force=True)
        manager.wait_until_finished()
    finally:
        manager.close()


class Checkpoint:
    """A loaded checkpoint: its header and its stored pytrees, restorable against templates."""

    def __init__(self, path: str, meta: dict, arrays: dict[str, dict[str, np.ndarray]]):
        self.path = path
        self.header = meta["header"]
        self.specs = meta["trees"]
        self._arrays = arrays

    def restore(self, name: str, template: Any) -> Any:
        """The stored tree ``name``, with ``template``'s structure (checked: structure, shapes, dtypes)."""
        if name not in self.specs:
            raise CheckpointMismatchError(f"checkpoint {self.path} has no {name!r} (it holds {sorted(self.specs)})")
        stored, wanted = self.specs[name], spec(template)
        for field in ("treedef", "shapes", "dtypes"):
            if stored[field] != wanted[field]:
                raise CheckpointMismatchError(
                    f"checkpoint {self.path} is from a different problem: its {name} has "
                    f"{field} {stored[field]}, this run's has {wanted[field]}. Use another "
                    f"checkpoint_dir, or delete this one to start afresh."
                )
        leaves, treedef = jax.tree.flatten(template)
        return jax.tree.unflatten(treedef, [
            jax.random.wrap_key_data(self._arrays[name][str(i)], impl=jax.random.key_impl(t)) if _is_key(t)
            else self._arrays[name][str(i)] for i, t in enumerate(leaves)])

    def restore_dict(self, name: str) -> dict[str, np.ndarray]:
        """A stored flat dict of arrays (such as a history), without a template."""
        if name not in self.specs:
            return {}
        keys = self.specs[name].get("keys")
        if keys is None or len(keys) != len(self.specs[name]["shapes"]):
            raise CheckpointMismatchError(f"checkpoint {self.path}: {name} is not a flat dict of arrays")
        return {k: self._arrays[name][str(i)] for i, k in enumerate(keys)}


def load(path: str | os.PathLike) -> Checkpoint | None:
    """Read the newest step of the checkpoint directory ``path``; ``None`` if there is none."""
    import orbax.checkpoint as ocp

    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        raise CheckpointMismatchError(f"{path} is not a readable hypergradient checkpoint: not a directory")
    manager = _manager(path)
    try:
        step = manager.latest_step()
        if step is None:
            return None
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if meta.get("format") != FORMAT:
                raise CheckpointMismatchError(f"{path} has checkpoint format {meta.get('format')}, expected {FORMAT}")
            empty = {name: {str(i): np.zeros(shape, dtype) for i, (shape, dtype) in
                            enumerate(zip(s["shapes"], s["dtypes"]))} for name, s in meta["trees"].items()}
            template = {name: {i: a for i, a in tree.items() if a.size} for name, tree in empty.items()}
            stored = manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(template)))["arrays"]
        except CheckpointMismatchError:
            raise
        except Exception as e:  # a folder we did not write, or damaged on disk
            raise CheckpointMismatchError(f"{path} is not a readable hypergradient checkpoint: {e}") from e
    finally:
        manager.close()
    arrays = {name: {**tree, **{k: np.asarray(v) for k, v in stored.get(name, {}).items()}}
              for name, tree in empty.items()}
    return Checkpoint(path, meta, arrays)


#: Header entries that are digests: what a difference in them means.
DIGESTS = {
    "hparams0": "other initial hyperparameters λ0",
    "hyper_optimizer": "another hyper-optimizer (or hyper learning rate)",
    "constraint": "another constraint",
}


def check_header(ckpt: Checkpoint, expected: Mapping[str, Any]) -> None:
    """Refuse ``ckpt`` unless its header agrees with ``expected`` on every given key."""
    diffs = [
        f"this run has {DIGESTS[k]}" if k in DIGESTS else f"{k}: checkpoint {ckpt.header.get(k)!r}, this run {v!r}"
        for k, v in expected.items()
        if _jsonable(ckpt.header.get(k)) != _jsonable(v)
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {ckpt.path} is from a different problem ("
            + "; ".join(diffs)
            + "). Use another checkpoint_dir, or delete this one to start afresh."
        )


def _jsonable(x):
    return json.loads(json.dumps(x))
