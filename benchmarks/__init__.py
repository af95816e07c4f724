"""The benchmarks, a package run from the repository root: ``python -m benchmarks.b1 --write b1.npz``.

Each module imports ``hypergradient`` as installed (``pip install -e '.[bench]'``, or
``PYTHONPATH=src``) and its siblings as ``benchmarks.*``; the runners start their child processes
the same way (``python -m benchmarks.run_ours``, cwd = the repository root).
"""
