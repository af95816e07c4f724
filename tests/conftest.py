"""Tests run in float64, so hypergradients can be checked to tight tolerances."""

import os

import jax

jax.config.update("jax_enable_x64", True)
# The command line keeps compiled programs under ~/.cache by default; the tests (and the commands
# they start) never write there. A test of the cache names its own folder.
os.environ["HYPERGRADIENT_COMPILE_CACHE"] = "0"
