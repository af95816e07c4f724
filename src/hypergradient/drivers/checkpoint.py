"""Atomic, structure-checked checkpoints of a driver's state.

A checkpoint is one ``.npz`` file holding named pytrees (their leaves as
arrays) and a JSON header. It is written to a temporary file in the same
directory, flushed to disk and moved over the old one with ``os.replace``, so
a process killed at any moment leaves either the previous checkpoint or the
new one, never a torn file.

Pytrees are restored against a *template* (the tree a fresh run would build):
the stored tree structure, shapes and dtypes must match it exactly, otherwise
:class:`CheckpointMismatchError` says what differs. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ..errors import CheckpointMismatchError

FORMAT = 1


def spec(tree: Any) -> dict:
    """A JSON-able description of a pytree: structure, shapes and dtypes of its leaves."""
    leaves, treedef = jax.tree.flatten(tree)
    return {
        "treedef": str(treedef),
        "shapes": [list(np.shape(x)) for x in leaves],
        "dtypes": [str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(np.dtype(x.dtype)) for x in leaves],
    }


def save(path: str | os.PathLike, trees: Mapping[str, Any], header: Mapping[str, Any]) -> None:
    """Write ``trees`` (name -> pytree) and a JSON ``header`` to ``path`` atomically."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    specs = {}
    for name, tree in trees.items():
        leaves = jax.tree.leaves(tree)
        specs[name] = spec(tree)
        if isinstance(tree, Mapping):
            specs[name]["keys"] = sorted(tree)  # the order in which a dict flattens
        for i, leaf in enumerate(leaves):
            arrays[f"{name}/{i}"] = np.asarray(leaf)
    meta = {"format": FORMAT, "header": dict(header), "trees": specs}
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not every platform allows opening a directory
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


class Checkpoint:
    """A loaded checkpoint: its header and its stored pytrees, restorable against templates."""

    def __init__(self, path: str, meta: dict, arrays: dict[str, np.ndarray]):
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
        treedef = jax.tree.structure(template)
        leaves = [self._arrays[f"{name}/{i}"] for i in range(treedef.num_leaves)]
        return jax.tree.unflatten(treedef, leaves)

    def restore_dict(self, name: str) -> dict[str, np.ndarray]:
        """A stored flat dict of arrays (such as a history), without a template."""
        if name not in self.specs:
            return {}
        keys = self.specs[name].get("keys")
        if keys is None or len(keys) != len(self.specs[name]["shapes"]):
            raise CheckpointMismatchError(f"checkpoint {self.path}: {name} is not a flat dict of arrays")
        return {k: self._arrays[f"{name}/{i}"] for i, k in enumerate(keys)}


def load(path: str | os.PathLike) -> Checkpoint | None:
    """Read the checkpoint at ``path``; ``None`` if there is none."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("__meta__")))
    except Exception as e:  # a file we did not write, or damaged on disk
        raise CheckpointMismatchError(f"{path} is not a readable hypergradient checkpoint: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path} has checkpoint format {meta.get('format')}, expected {FORMAT}")
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
