"""Hyperparameter optimization drivers: offline, online (real time) and constraints."""
