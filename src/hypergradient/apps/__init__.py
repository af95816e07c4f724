"""The applications built on the library: datasets, models, the papers' experiments, the
comparison with black-box search and the ``hypergradient`` command.

Nothing in the core (dynamics, data, optim, methods, drivers, constraints) imports from here.
"""
