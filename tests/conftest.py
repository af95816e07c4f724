"""Tests run in float64, so hypergradients can be checked to tight tolerances."""

import gc
import os

import jax
import pytest

jax.config.update("jax_enable_x64", True)
# The command line keeps compiled programs under ~/.cache by default; the tests (and the commands
# they start) never write there. A test of the cache names its own folder.
os.environ["HYPERGRADIENT_COMPILE_CACHE"] = "0"


#: Resident memory past which a worker drops the programs it compiled (Linux; elsewhere always).
RELEASE_ABOVE_BYTES = 2 << 30


def _resident_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free the programs compiled so far once a test module is done, if the worker holds more than
    RELEASE_ABOVE_BYTES: an xdist worker runs hundreds of tests in one process, and JAX keeps every
    executable it compiled (6 GB per worker by the end of the suite, enough with the processes some
    tests start to exhaust a 24 GiB machine). Below that, later modules reuse what is compiled."""
    yield
    resident = _resident_bytes()
    if resident is None or resident > RELEASE_ABOVE_BYTES:
        jax.clear_caches()
        gc.collect()
