# Quick start: `make demo` (set up, run the main job on bundled data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench bench-sweeps clean

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

bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks.bench

bench-sweeps: $(VENV)/.installed-bench
	$(PY) -m benchmarks.sweeps

clean:
	rm -rf $(VENV) results .pytest_cache
