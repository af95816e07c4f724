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

clean:
	rm -rf $(VENV) results .pytest_cache
