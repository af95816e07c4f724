"""Atomic, structure-checked checkpoints of a driver's state, written by orbax-checkpoint.

A checkpoint is a directory that orbax's ``CheckpointManager`` manages: one step folder per save,
holding named pytrees (their leaves as arrays) and a JSON header. Orbax writes a step to a
temporary folder and renames it when complete, and the last two steps are kept, so a process
killed at any moment (SIGKILL included) leaves an intact step behind, never only a torn one.
Arrays sharded over devices or processes are written by the processes that hold them; every
process of a multi-process run calls :func:`save`.

Nothing damaged is loaded silently. The JSON meta holds a SHA-256 digest of every saved array
(its dtype, shape and bytes), and ``integrity.json``, written into the step folder once orbax
has finished it, the size and SHA-256 of every file of the step. :func:`load` checks both: a
step with a flipped byte, a missing or truncated file, or no ``integrity.json`` (a save cut short)
is skipped with a :class:`CheckpointWarning` for the previous step, and when no step is intact
:class:`CheckpointMismatchError` names what is damaged. Temporary folders that a killed save
left behind are removed when a checkpoint directory is opened.

Pytrees are restored against a *template* (the tree a fresh run would build): the stored tree
structure, shapes and dtypes must match it exactly, otherwise
:class:`CheckpointMismatchError` says what differs. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import warnings
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

#: How many steps a checkpoint directory keeps: the newest, and the one to fall back to when the
#: newest is damaged.
KEEP = 2

#: The file in a step folder that lists every other file with its size and SHA-256.
INTEGRITY = "integrity.json"

#: What orbax names a step (or item) folder it has not finished writing.
_TMP = ".orbax-checkpoint-tmp"


class CheckpointWarning(UserWarning):
    """A checkpoint step was skipped as damaged, or loaded without the digests to check it."""


class _Damaged(Exception):
    """One step of a checkpoint cannot be trusted; the message says why, in a few words."""


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


def digest(x: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (C order): equal exactly when the arrays are."""
    x = np.ascontiguousarray(x)
    h = hashlib.sha256(f"{x.dtype}{list(x.shape)}".encode())
    h.update(x.tobytes())
    return h.hexdigest()


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_digest(x: Any) -> str:
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()


def _files(folder: str) -> list[str]:
    """The files under ``folder`` (relative, with ``/``), ``integrity.json`` left out."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != INTEGRITY and not rel.startswith(INTEGRITY + "."):
                out.append(rel)
    return sorted(out)


def _write_integrity(folder: str) -> None:
    """List every file of the finished step ``folder`` with its size and SHA-256, atomically."""
    files = {rel: [os.path.getsize(os.path.join(folder, rel)), _file_digest(os.path.join(folder, rel))]
             for rel in _files(folder)}
    tmp = os.path.join(folder, f"{INTEGRITY}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files, "digest": _json_digest(files)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, INTEGRITY))


def _check_files(folder: str) -> bool:
    """Raise :class:`_Damaged` unless every file ``integrity.json`` lists is there, whole; False
    when the step has no ``integrity.json``."""
    where = os.path.join(folder, INTEGRITY)
    if not os.path.exists(where):
        return False
    try:
        with open(where) as f:
            stored = json.load(f)
        files = stored["files"]
        ok = stored["digest"] == _json_digest(files)
    except Exception:
        ok = False
    if not ok:
        raise _Damaged(f"{INTEGRITY} is damaged")
    for rel, (size, sha) in files.items():
        name = os.path.join(folder, rel)
        if not os.path.isfile(name):
            raise _Damaged(f"{rel} is missing")
        if os.path.getsize(name) != size:
            raise _Damaged(f"{rel} has {os.path.getsize(name)} bytes, {size} were written")
        if _file_digest(name) != sha:
            raise _Damaged(f"{rel} is not the file that was written (SHA-256 differs)")
    return True


def _primary() -> bool:
    return jax.process_index() == 0


def _remove_stale_temporaries(path: str) -> None:
    """Remove the temporary folders of saves that were killed before orbax renamed them."""
    if not _primary():
        return
    for name in os.listdir(path):
        if _TMP in name:
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)


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
    options = ocp.CheckpointManagerOptions(max_to_keep=KEEP, enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(os.path.abspath(path), options=options, item_names=("arrays", "meta"))


def save(path: str | os.PathLike, trees: Mapping[str, Any], header: Mapping[str, Any]) -> None:
    """Write ``trees`` (name -> pytree) and a JSON ``header`` as the newest step of the checkpoint
    directory ``path``, atomically, with the digests that :func:`load` checks; the header's ``step``
    numbers it."""
    import orbax.checkpoint as ocp

    path = os.fspath(path)
    arrays: dict[str, list] = {}
    specs, digests = {}, {}
    for name, tree in trees.items():
        leaves = [_storable(x) for x in jax.tree.leaves(tree)]
        specs[name] = spec(tree)
        if isinstance(tree, Mapping):
            specs[name]["keys"] = sorted(tree)  # the order in which a dict flattens
        # an array spread over several processes is written by them all; anything else, from the host
        arrays[name] = {str(i): leaf if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
                        else np.asarray(leaf) for i, leaf in enumerate(leaves) if np.size(leaf)}  # empty: the spec says it all
        # no process holds a spread array's bytes; integrity.json covers the files they are in
        digests[name] = {i: digest(a) for i, a in arrays[name].items() if isinstance(a, np.ndarray)}
    meta = {"format": FORMAT, "header": dict(header), "trees": specs, "digests": digests}
    step = int(header.get("step", 0))
    _set_aside(path, step)
    manager = _manager(path)
    try:
        manager.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
                     force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    if _primary():  # a kill before this leaves a step without integrity.json, which load skips
        _write_integrity(os.path.join(path, str(step)))


def _set_aside(path: str, step: int) -> None:
    """Move the steps numbered ``step`` or later out of orbax's way, to ``<path>.damaged/``: they
    are the steps that :func:`load` skipped as damaged (a run resumes from the newest intact one)."""
    if _primary() and os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if name.isdigit() and int(name) >= step:
                os.makedirs(path + ".damaged", exist_ok=True)
                dest, n = os.path.join(path + ".damaged", name), 1
                while os.path.exists(dest):
                    dest, n = os.path.join(path + ".damaged", f"{name}-{n}"), n + 1
                os.replace(os.path.join(path, name), dest)
                warnings.warn(CheckpointWarning(f"checkpoint {path}: step {name}, skipped as damaged, is moved to "
                                                f"{dest}"), stacklevel=3)
    if jax.process_count() > 1:  # no process may save while the first is still moving steps away
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("hypergradient checkpoint: damaged steps set aside")


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
    """Read the newest intact step of the checkpoint directory ``path``; ``None`` if there is none.

    Every file of a step and every array in it is checked against the digests written with it. A
    damaged step is skipped with a :class:`CheckpointWarning` naming it and what is wrong; when
    none is intact, :class:`CheckpointMismatchError` says so in one line. Temporary folders of
    saves that were killed are removed first.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        raise CheckpointMismatchError(f"{path} is not a readable hypergradient checkpoint: not a directory")
    _remove_stale_temporaries(path)
    _drop_abandoned_reads()
    skipped, found = [], None
    with _orbax_errors_unlogged():
        manager = _manager(path)
        try:
            for step in sorted(manager.all_steps(), reverse=True):
                try:
                    found = _read(manager, path, step)
                    break
                except _Damaged as e:
                    skipped.append(f"step {step}: {e}")
        finally:
            manager.close()
    if found is None and skipped:
        raise CheckpointMismatchError(f"{path} is not a readable hypergradient checkpoint ({'; '.join(skipped)}). "
                                      f"Delete it to start afresh.")
    if skipped:
        warnings.warn(CheckpointWarning(
            f"checkpoint {path} is damaged ({'; '.join(skipped)}): loaded step {found.header.get('step')}, the "
            f"newest intact one; the next save moves the damaged steps to {path}.damaged"), stacklevel=2)
    return found


@contextlib.contextmanager
def _orbax_errors_unlogged():
    """Orbax's own log of what it cannot read (a file it cannot parse) held back while a
    checkpoint loads: :func:`load` says what is damaged, in one warning or one error."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _is_abandoned_read(unraisable) -> bool:
    """An unraisable ``RuntimeError: Event loop is closed`` raised where a read's result was
    handed to a closed event loop (``call_soon_threadsafe``)."""
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    frames, tb = [], unraisable.exc_traceback
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return "call_soon_threadsafe" in frames


def _is_failed_abandoned_read(record: logging.LogRecord) -> bool:
    """asyncio's "Task exception was never retrieved" for a tensorstore read that failed after
    the restore had already failed on another one: the same abandoned read, failing instead of
    completing."""
    error = record.exc_info[1] if record.exc_info else None
    return (error is not None and record.getMessage().startswith("Task exception was never retrieved")
            and "tensorstore" in str(error))


class _AbandonedReadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _is_failed_abandoned_read(record)


def _drop_abandoned_reads() -> None:
    """Keep Python from reporting the reads that orbax abandoned when a restore failed.

    Orbax runs a restore on an event loop of its own and closes that loop when the first read
    fails (damaged data); the tensorstore reads still in flight complete later into the closed
    loop, and Python prints each as an unraisable "Event loop is closed" traceback, at any moment
    after; one that fails too is logged by asyncio as "Task exception was never retrieved" when
    it is collected. Nobody awaits their results: the hook and the log filter installed here drop
    exactly those reports and pass every other one on."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReadFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedReadFilter())
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable):
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0][:200] if lines else "") or type(e).__name__


def _read(manager, path: str, step: int) -> Checkpoint:
    """Step ``step`` of ``path``, checked against its digests; :class:`_Damaged` when it does not
    match them, :class:`CheckpointMismatchError` when it is of another format."""
    import orbax.checkpoint as ocp

    verified = _check_files(os.path.join(path, str(step)))
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict):
            raise TypeError(f"its meta is a {type(meta).__name__}")
    except Exception as e:  # a folder we did not write, or damaged on disk
        raise _Damaged(f"its meta cannot be read: {_first_line(e)}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path} has checkpoint format {meta.get('format')}, expected {FORMAT}")
    digests = meta.get("digests")
    if digests is not None and not verified:
        raise _Damaged(f"it has no {INTEGRITY} (its save was cut short, or the file was deleted)")
    try:
        empty = {name: {str(i): np.zeros(shape, dtype) for i, (shape, dtype) in
                        enumerate(zip(s["shapes"], s["dtypes"]))} for name, s in meta["trees"].items()}
        template = {name: {i: a for i, a in tree.items() if a.size} for name, tree in empty.items()}
        stored = manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(template)))["arrays"]
        stored = {name: {k: np.asarray(v) for k, v in tree.items()} for name, tree in stored.items()}
    except Exception as e:
        raise _Damaged(f"its arrays cannot be read: {_first_line(e)}") from e
    for name, tree in (digests or {}).items():
        keys = meta["trees"].get(name, {}).get("keys")
        for i, expected in tree.items():
            if i not in stored.get(name, {}) or digest(stored[name][i]) != expected:
                leaf = f"{name}[{keys[int(i)]!r}]" if keys else f"leaf {i} of {name}"
                raise _Damaged(f"array {leaf} in arrays/ is not the one saved (SHA-256 differs)")
    if digests is None and not verified:
        warnings.warn(CheckpointWarning(f"checkpoint {path} (step {step}) was written by a version without "
                                        "checkpoint digests: it is loaded unchecked"), stacklevel=4)
    arrays = {name: {**tree, **stored.get(name, {})} for name, tree in empty.items()}
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
