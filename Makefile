# Quick start: `make demo` (set up, run the main job on bundled data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test docs bench bench-sweeps clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[$*]"
	touch $@

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/hypergradient run schedules

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 -q

# The site in site/ (index.html): API reference, guides, tutorials executed on the way. Offline;
# any warning, unresolved reference or failing notebook cell fails it.
docs: $(VENV)/.installed-docs
	rm -rf site
	$(VENV)/bin/sphinx-build -W --keep-going -T -q -b html docs site

bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks.bench

bench-sweeps: $(VENV)/.installed-bench
	$(PY) -m benchmarks.sweeps

# The oldest Python and dependency versions pyproject.toml declares (.ci/floor.txt), in a venv of their own.
# It runs the library's tests that take seconds, which reach every module at the oldest versions; whole
# commands, experiments, examples and benchmarks (marked end_to_end, Ray's trials among them: the floor
# does not pin Ray) and the sweeps of many compiled programs (marked slow, each over ~10 s) are left to
# `make test`, which runs everything.
FLOOR_PYTHON ?= python3.11
FLOOR_VENV := .venv-floor

$(FLOOR_VENV)/.installed: pyproject.toml .ci/floor.txt
	rm -rf $(FLOOR_VENV)
	$(FLOOR_PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install -q -c .ci/floor.txt -e ".[test]"
	touch $@

.PHONY: test-floor
test-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -m pytest -n 2 -q -m "not end_to_end and not slow"

clean:
	rm -rf $(VENV) $(FLOOR_VENV) results .pytest_cache site jupyter_execute
