"""Ctrl-C at any moment of an offline driver's loop leaves a checkpoint that resumes to the
uninterrupted run: the update from one hyper-step to the next is never cut in half."""

import os
import signal

import numpy as np
import optax
import pytest

from hypergradient.drivers import checkpoint as ckpt
from hypergradient.drivers import core
from hypergradient.drivers.offline import optimize
from problems import ridge_problem


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (a test runner may have installed another)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_ctrl_c_in_a_held_block_is_raised_when_it_ends(python_sigint):
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with ckpt.sigint_held():
            os.kill(os.getpid(), signal.SIGINT)
            ran.append("rest of the block")
    assert ran == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_the_update_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, python_sigint):
    dyn, objective, lam = ridge_problem(steps=20)
    full = optimize(dyn, objective, lam, hyper_optimizer=optax.adam(0.05), hyper_steps=6)
    record = core.Tuning.record

    def record_then_ctrl_c(self, *args):  # Ctrl-C lands after the history row of hyper-step 2, before λ_3
        record(self, *args)
        if len(self.history["value"]) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(core.Tuning, "record", record_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        optimize(dyn, objective, lam, hyper_optimizer=optax.adam(0.05), hyper_steps=6, checkpoint_dir=tmp_path)
    monkeypatch.setattr(core.Tuning, "record", record)
    rest = optimize(dyn, objective, lam, hyper_optimizer=optax.adam(0.05), hyper_steps=6, checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(rest.history["value"], full.history["value"])
    np.testing.assert_array_equal(rest.history["hparams"]["lr"], full.history["hparams"]["lr"])
    assert float(rest.hparams["lr"]) == float(full.hparams["lr"])
