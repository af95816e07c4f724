"""What the applications print and accept at the terminal: status lines, exit codes, argument types."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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


def _int_at_least(text: str, low: int, kind: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {value}")
    return value


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
