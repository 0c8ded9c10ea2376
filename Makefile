# make run / make test set up everything they need on first use: .venv (plain pip) and the data set.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?= --device cpu --epochs 3 --batch-size 64 --rounds 2

.PHONY: setup data run test lint bench clean

setup: $(STAMP) data

# Plain pip on purpose: it takes torch from the wheels on local disk; uv and poetry would download gigabytes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e ".[dev,sweep,tracking]"
	rm -f $(VENV)/.installed-*
	touch $@

data:
	bash scripts/get_data.sh

run: setup
	$(PY) -m fmnist_lab $(ARGS)

# One worker per core (tests/conftest.py gives each one CPU thread); PYTEST_ARGS="-n 0" runs them in one process.
test: setup
	$(PY) -m pytest -n auto --dist loadfile $(PYTEST_ARGS)

# Side-by-side training speed (scripts/bench.py); on a GPU: make bench BENCH_ARGS="--device cuda"
bench: setup
	$(PY) scripts/bench.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache src/*.egg-info
