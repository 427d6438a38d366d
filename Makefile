# warmcast — the two commands: `make demo` (run the main job on embedded defaults) and
# `make test` (run the test suite). Both create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-slow bench install lock clean airflow

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

## test: the default suite (slow tests that read ../shared/data are deselected; see test-slow).
## Store tests also run against the PostgreSQL server below (each run creates and drops its own
## schema); set WARMCAST_TEST_PG_URL= (empty) where no server runs, and they report as skipped.
WARMCAST_TEST_PG_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
export WARMCAST_TEST_PG_URL
test: $(STAMP)
	$(VENV)/bin/pytest

test-slow: $(STAMP)
	$(VENV)/bin/pytest -m slow

## bench: the headline benchmarks, one JSON line each
bench: $(STAMP)
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/lake_reads.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/forecast.py
	$(PY) benchmarks/aggregate.py
	$(PY) benchmarks/scaler.py
	$(PY) benchmarks/simulate.py

## airflow: the embedded Airflow (standalone: SQLite, LocalExecutor) on http://127.0.0.1:8080,
## with the warmcast DAGs over var/landing and var/lake; the login is printed at start-up.
## Scheduled runs start at the current hour; back-fill older data with `airflow backfill create`.
AIRFLOW_PORT ?= 8080
airflow: $(STAMP)
	mkdir -p var/airflow var/landing var/lake
	PATH="$(abspath $(VENV))/bin:$$PATH" \
	AIRFLOW_HOME="$(abspath var/airflow)" \
	AIRFLOW__CORE__DAGS_FOLDER="$(abspath dags)" \
	AIRFLOW__CORE__LOAD_EXAMPLES=False \
	AIRFLOW__CORE__EXECUTOR=LocalExecutor \
	AIRFLOW__CORE__PARALLELISM=4 \
	AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG=4 \
	AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES=1 \
	AIRFLOW__API__HOST=127.0.0.1 \
	AIRFLOW__API__PORT=$(AIRFLOW_PORT) \
	AIRFLOW__API__WORKERS=1 \
	AIRFLOW__API__BASE_URL=http://127.0.0.1:$(AIRFLOW_PORT) \
	AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$(AIRFLOW_PORT)/execution/ \
	AIRFLOW__WARMCAST__START_DATE="$$(date -u +%Y-%m-%dT%H:00:00+00:00)" \
	WARMCAST_LAKE="$${WARMCAST_LAKE:-$(abspath var/lake)}" WARMCAST_LANDING="$${WARMCAST_LANDING:-$(abspath var/landing)}" \
	WARMCAST_STORE_URL="$${WARMCAST_STORE_URL:-sqlite:///$(abspath var/warmcast.db)}" \
	airflow standalone

## lock: refresh constraints.txt from the current environment
lock:
	$(PY) -m pip freeze --exclude-editable | sed -e 's/+cpu$$//' > constraints.txt

clean:
	rm -rf var .pytest_cache
