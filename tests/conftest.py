"""Tests run in float64, so hypergradients can be checked to tight tolerances."""

import gc
import os

import jax
import pytest

jax.config.update("jax_enable_x64", True)
# The command line keeps compiled programs under ~/.cache by default; the tests (and the commands
# they start) never write there. A test of the cache names its own folder.
os.environ["HYPERGRADIENT_COMPILE_CACHE"] = "0"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free the programs a test module compiled once it is done: an xdist worker runs hundreds of
    tests in one process, and JAX keeps every executable it compiled (several GB per worker by the
    end of the suite, enough with the processes some tests start to exhaust a 24 GiB machine)."""
    yield
    jax.clear_caches()
    gc.collect()
