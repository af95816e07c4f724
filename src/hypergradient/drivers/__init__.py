"""Hyperparameter optimization drivers: offline, online (real time), progress and checkpoints."""
