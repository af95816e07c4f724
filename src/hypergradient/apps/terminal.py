"""What the applications print and accept at the terminal: status lines, exit codes, argument types."""

from __future__ import annotations

import argparse
import importlib.util
import sys

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def say(message: str) -> None:
    """A status line for the person running a command (stderr, so stdout stays the summary)."""
    print(message, file=sys.stderr, flush=True)


def missing_extra(module: str, extra: str) -> str | None:
    """``None`` if ``module`` can be imported; otherwise the command that installs the extra bringing it."""
    if importlib.util.find_spec(module) is not None:
        return None
    return f"pip install 'hypergradient[{extra}]'"


def integer(text: str) -> int:
    """argparse type: any integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value
