"""Fingerprints: equal for objects that compute the same thing, different otherwise, in-process and across."""

import optax

import hypergradient as hg
from hypergradient.drivers import fingerprint


def test_constraints_differ_by_their_settings():
    a, b = hg.constraints.box(0.0, 1.0), hg.constraints.box(0.0, 2.0)
    assert fingerprint.digest(a) != fingerprint.digest(b)
    assert fingerprint.key(a) != fingerprint.key(b)
    assert fingerprint.digest(a) == fingerprint.digest(hg.constraints.box(0.0, 1.0))
    assert fingerprint.key(a) == fingerprint.key(hg.constraints.box(0.0, 1.0))
    assert fingerprint.digest(hg.constraints.simplex()) != fingerprint.digest(hg.constraints.nonnegative())


def test_hyper_optimizers_compare_by_what_they_compute():
    assert fingerprint.digest(optax.adam(0.1)) == fingerprint.digest(optax.adam(0.1))
    assert fingerprint.digest(optax.adam(0.1)) != fingerprint.digest(optax.adam(0.2))
    assert fingerprint.key(optax.adam(0.1)) == fingerprint.key(optax.adam(0.1))
