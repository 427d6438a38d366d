# warmcast — the two commands: `make demo` (run the main job on embedded defaults) and
# `make test` (run the test suite). Both create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-slow bench install lock clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "warmcast needs Python >= 3.11; set PYTHON=python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## demo: generate a small synthetic platform, ingest it into var/lake, print its demand summary
demo: $(STAMP)
	$(VENV)/bin/warmcast demo

## test: the default suite (slow tests that read ../shared/data are deselected; see test-slow)
test: $(STAMP)
	$(VENV)/bin/pytest

test-slow: $(STAMP)
	$(VENV)/bin/pytest -m slow

## bench: the headline benchmarks, one JSON line each
bench: $(STAMP)
	$(PY) benchmarks/ingest.py

## lock: refresh constraints.txt from the current environment
lock:
	$(PY) -m pip freeze --exclude-editable | sed -e 's/+cpu$$//' > constraints.txt

clean:
	rm -rf var .pytest_cache
