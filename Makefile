# The README's commands. `make up` installs what is missing, starts the local
# stack and runs the main job; `make test` runs the test suite against it.
SHELL := /bin/bash
.DEFAULT_GOAL := help
F1 := .venv/bin/f1

.PHONY: help install up down status test test-faults lint audit bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install:  ## install packages, Python environments and Kafka jars (idempotent)
	@bash infra/bootstrap.sh

up: install  ## start the whole stack and run the main job
	@$(F1) stack up
	@$(F1) export --skip-existing
	@$(F1) topics
	@$(F1) dashboards import
	@$(F1) demo

down:  ## stop the stack (harmless when nothing runs)
	@if [ -x $(F1) ]; then $(F1) stack down; else echo "nothing to stop: not installed yet"; fi

status:  ## each service: running, healthy, URL
	@if [ -x $(F1) ]; then $(F1) stack status; else echo "not installed yet: run make up"; fi

test: install  ## the test suite (starts the stack if needed, stops what it started)
	@.venv/bin/pytest

test-faults: install  ## every fault test, the long ones too (private broker, database, Airflow)
	@.venv/bin/pytest -m faults tests/integration/test_faults.py tests/integration/test_airflow_faults.py

lint: install  ## ruff and mypy
	@.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

audit: install  ## pip-audit of both locked environments (fails on fixable vulnerabilities)
	@.venv/bin/python -m pipeline.audit

bench: install  ## the benchmark suite (figures, not pass/fail) -> docs/benchmarks.md
	@$(F1) bench all
