# flagjax: `make run` trains on the embedded default, `make test` runs lint + the test suite.
# Both create or refresh the local virtual environment (.venv) first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEVICES ?= 8
# pytest-xdist workers (one per core, at most this many: each holds its own JAX and 8 simulated devices)
TEST_PROCS ?= 4

.PHONY: venv data run demo test lint bench clean

venv: $(VENV)/.installed

# (setup.py compiles the CPU kernels in flagjax/csrc: a change there reinstalls)
$(VENV)/.installed: pyproject.toml setup.py $(wildcard flagjax/csrc/*.cc)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Real Fashion-MNIST, offline, from Debian's dataset-fashion-mnist package (installed when root).
data:
	@bash scripts/get_data.sh

demo: venv
	$(VENV)/bin/flagjax demo

run: venv data
	$(VENV)/bin/flagjax compare --config experiments/configs/fashion_cnn.py

lint: venv
	$(VENV)/bin/ruff check flagjax tests benchmarks $(wildcard experiments notebooks scripts)
	$(VENV)/bin/ruff format --check flagjax tests benchmarks $(wildcard experiments notebooks scripts)

test: lint
	XLA_FLAGS=--xla_force_host_platform_device_count=$(DEVICES) $(PY) -m pytest -q -n auto --maxprocesses=$(TEST_PROCS) --dist worksteal --durations=20 tests

bench: venv
	$(PY) benchmarks/aggregation.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
