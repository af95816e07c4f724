"""Processes that Ray tests start and stop: their environment, and killing exactly what one started
(never ``ray stop``, which would stop every Ray instance of the machine's user)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil

import hypergradient as hg

#: The checkout's ``src``: processes started by a test import this checkout, not an installed one.
SRC = str(Path(hg.__file__).resolve().parents[1])


def ray_env(**extra: str) -> dict:
    """This environment, on CPU, with the checkout first on ``PYTHONPATH`` and Ray's token
    authentication off: Ray 2.60 turns it on for ``ray start --head`` wherever ~/.ray/auth_token
    exists (any local ``ray.init`` creates it), but not for a node joining by address, which then
    never gets in."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **extra}


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process started here in a session of its own, its process group, and every
    process it started (Ray's raylets and workers sit in process groups of their own), then reap it."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
