"""Tests run in float64, so hypergradients can be checked to tight tolerances."""

import jax

jax.config.update("jax_enable_x64", True)
