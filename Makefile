# Two commands do all the set-up: `make bench` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
# Pinned CPU wheel by default (fast, offline-safe here); override e.g. `make TORCH='torch==2.5.1' test`.
TORCH ?= torch==2.13.0
SUITE ?= default
# Extra `bench run` flags, e.g. `make bench SUITE=recall BENCH_ARGS='--executor ray --threads 1'` (two cells at once).
BENCH_ARGS ?=
PY := $(VENV)/bin/python

.PHONY: bench test lint report clean-venv

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,ray]"
	touch $@

bench: $(VENV)/.installed
	$(PY) -m bench run --suite $(SUITE) $(BENCH_ARGS)

test: $(VENV)/.installed
	mkdir -p results/ci-scaling
	$(PY) -m pytest --benchmark-json=results/ci-scaling/benchmark.json

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

report: $(VENV)/.installed
	@test -n "$(RUN)" || (echo "usage: make report RUN=results/<run-id>" && exit 2)
	$(PY) -m bench report $(RUN)

clean-venv:
	rm -rf $(VENV)
