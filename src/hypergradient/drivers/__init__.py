"""Hyperparameter optimization drivers: offline, online (real time) and population, on one core (core.py), with progress and checkpoints."""
