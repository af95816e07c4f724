"""Hyperparameter optimization drivers: offline, online (real time) and population, each a loop
on one core (``core``: result, hyper-update, checkpointed state), with progress and checkpoints."""
