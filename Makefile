# Set-up and checks. `make install` then `make test` is all a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A local CPU build of torch, where this machine has one; elsewhere pip picks torch as usual.
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-*+cpu-*.whl))

.PHONY: install test lint fixtures bench efficacy clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
ifneq ($(TORCH_WHEEL),)
	$(BIN)/python -m pip install --quiet "$(TORCH_WHEEL)"
endif
	$(BIN)/python -m pip install --quiet -e ".[test,dev,eval,bench]"

test:
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check adapter_fix tests fixtures bench
	$(BIN)/ruff format --check adapter_fix tests fixtures bench

fixtures:
	$(BIN)/python fixtures/make_fixtures.py
	$(BIN)/python fixtures/make_miniature.py
	$(BIN)/python fixtures/make_bad.py

bench:
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/workers.py
	$(BIN)/python bench/perf.py

# The realistic testbed (bench/testbed): builds what is missing (~20 min once), then every
# method on every adapter, measured by eval on held-out prompts (~30 min). Not run by CI.
efficacy:
	$(BIN)/python bench/testbed/efficacy.py

clean:
	rm -rf $(VENV) bench/_work .pytest_cache
