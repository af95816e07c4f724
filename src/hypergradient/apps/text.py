"""Byte-level text corpora from local folders: several sources, contiguous windows as examples.

Nothing is downloaded. A corpus is a folder whose entries (subfolders, or single files) are its
sources; each source's bytes are its files' contents, concatenated in sorted path order.
:func:`stdlib_sources` takes a few packages of the running Python's standard library, text that
ships with every Python; its bytes (and so any result on it) depend on the Python version,
:func:`python_version` says which.
"""

from __future__ import annotations

import platform
import sysconfig
from pathlib import Path

import numpy as np

STDLIB_PACKAGES = ("json", "email", "asyncio", "unittest")


def python_version() -> str:
    """The running Python's version, e.g. ``"3.11.7"``: the standard library's text depends on it."""
    return platform.python_version()


def folder_sources(root, names=None, pattern: str = "*", max_bytes: int | None = None) -> dict[str, bytes]:
    """``{name: bytes}``, one source per entry of ``root`` (or the named ones, in that order).

    A subfolder's source is its files matching ``pattern`` (recursively, sorted by path)
    concatenated; a file is a source on its own. ``max_bytes`` keeps each source's first bytes.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no text folder {root}")
    entries = [root / n for n in names] if names else sorted(root.iterdir())
    out = {}
    for entry in entries:
        if entry.is_dir():
            files = sorted(f for f in entry.rglob(pattern) if f.is_file())
        elif entry.is_file():
            files = [entry]
        else:
            raise FileNotFoundError(f"no source {entry}")
        text = b"".join(f.read_bytes() for f in files)
        if not text:
            raise ValueError(f"source {entry} has no text matching {pattern!r}")
        out[entry.name] = text[:max_bytes]
    return out


def stdlib_sources(names=STDLIB_PACKAGES, max_bytes: int | None = None) -> dict[str, bytes]:
    """The ``.py`` files of a few standard-library packages, one source each."""
    return folder_sources(sysconfig.get_paths()["stdlib"], names, "*.py", max_bytes)


def windows(sources: dict[str, bytes], length: int, val_fraction: float = 0.1):
    """Non-overlapping windows of ``length`` consecutive bytes, each labelled by its source.

    Each source's first ``1 - val_fraction`` of bytes gives training windows and the rest
    validation windows, so no validation window overlaps a training one.

    Returns:
      ``(train, val)``, each ``(tokens int32 (N, length), source int32 (N,))``, windows in source
      order.
    """
    return _cut(sources, length, {"train": 1 - val_fraction, "val": val_fraction})


def splits(sources: dict[str, bytes], length: int, val_fraction: float = 0.05, test_fraction: float = 0.05):
    """:func:`windows` in three parts: each source's bytes cut into consecutive training,
    validation and test stretches (``1 - val_fraction - test_fraction``, ``val_fraction``,
    ``test_fraction`` of them), so no two parts share a byte.

    Returns:
      ``(train, val, test)``, each ``(tokens int32 (N, length), source int32 (N,))``.
    """
    if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be positive "
                         "and leave bytes to train on")
    return _cut(sources, length, {"train": 1 - val_fraction - test_fraction, "val": val_fraction,
                                  "test": test_fraction})


def _cut(sources: dict[str, bytes], length: int, fractions: dict[str, float]):
    parts = {split: ([], []) for split in fractions}
    for i, text in enumerate(sources.values()):
        data = np.frombuffer(text, np.uint8)
        cuts = np.floor(np.cumsum([0.0, *fractions.values()]) * len(data) + 1e-9).astype(int)
        cuts[-1] = len(data)
        for split, start, stop in zip(fractions, cuts[:-1], cuts[1:]):
            piece = data[start:stop]
            n = len(piece) // length
            if n == 0:
                raise ValueError(f"source {i} has too few bytes for a {split} window of {length}")
            parts[split][0].append(piece[: n * length].reshape(n, length).astype(np.int32))
            parts[split][1].append(np.full(n, i, np.int32))
    return tuple((np.concatenate(t), np.concatenate(s)) for t, s in parts.values())
