"""What the applications print and accept at the terminal: status lines, exit codes, argument types."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import sys
from pathlib import Path

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

#: The exit codes, as ``--help`` lists them.
EXIT_CODES = f"""\
exit codes:
  {EXIT_OK:<4} done
  {EXIT_DIVERGED:<4} the run diverged (training went to inf or NaN)
  {EXIT_USAGE:<4} usage error: an unknown experiment, dataset or method, a malformed number, an empty --out
  {EXIT_INPUT:<4} bad input: data missing, unreadable or too small; a results folder that is a file, read-only,
       full or held by another run; a checkpoint that cannot be read or is of another problem
  {EXIT_INTERRUPTED:<4} interrupted (Ctrl-C): what finished is kept, and the same command resumes
"""

#: The largest --seed: jax.random.PRNGKey takes a 32-bit seed.
MAX_SEED = 2**32 - 1


def say(message: str) -> None:
    """A status line for the person running a command (stderr, so stdout stays the summary)."""
    print(message, file=sys.stderr, flush=True)


def missing_extra(module: str, extra: str) -> str | None:
    """``None`` if ``module`` can be imported; otherwise the command that installs the extra bringing it."""
    try:
        if importlib.util.find_spec(module) is not None:
            return None
    except ImportError:  # an import hook that refuses it
        pass
    return f"pip install 'hypergradient[{extra}]'"


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    return _int_at_least(text, 0, "a non-negative integer")


def seed(text: str) -> int:
    """argparse type: a random seed, an integer in [0, 2**32 - 1]."""
    value = _int_at_least(text, 0, "a non-negative integer")
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed of at most {MAX_SEED} (32 bits), got {value}")
    return value


def folder_name(text: str) -> str:
    """argparse type: a folder's path, not empty (``--out ""`` is a slip, not "the default")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty path (leave --out out for the default)")
    return text


def _int_at_least(text: str, low: int, kind: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {value}")
    return value


def os_error(e: OSError, out: Path) -> str:
    """One line for a failed read or write under the results folder ``out``: the file, the cause and,
    for a full disk or a read-only folder, what to do."""
    if e.errno is None:  # raised with a message of our own (a dataset not found)
        return str(e)
    where = e.filename if e.filename is not None else out
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        return (f"cannot write {where}: {reason.lower()}; free some space and run the same command again "
                "(it resumes from the last checkpoint)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write the results to {out}: {where}: {reason.lower()}; choose another --out"
    return f"{where}: {reason}"


def not_a_folder(path: Path) -> str | None:
    """Why ``path`` cannot be made a results folder (it, or a folder above it, is a file), or ``None``."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else f"{p} is a file, not a folder"
    return None


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value
