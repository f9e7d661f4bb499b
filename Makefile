# `make demo` and `make test` work on a fresh machine: each creates the venv and installs
# what it needs. pip caches the llama-cpp-python wheel it builds (~5 min on 2 cores), so
# later venvs reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GT := $(VENV)/bin/gputorrent
PYTEST_ARGS ?=

.PHONY: install model demo lint test bench bench-anchor clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

model: install
	$(GT) models pull smollm2

demo: model
	$(PY) -m gputorrent.demo

lint: install
	$(VENV)/bin/ruff check gputorrent tests benchmarks
	$(VENV)/bin/mypy

test: model lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: model
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/dht.py
	$(PY) benchmarks/failover.py
	$(PY) benchmarks/concurrency.py
	$(PY) benchmarks/chaos.py
	$(PY) benchmarks/fuzz.py
	$(PY) benchmarks/shards.py
	$(PY) benchmarks/simulate.py --sizes 1000,10000

# The mesh beside llama.cpp's own server; builds llama-server once (~12 min on 2 cores).
bench-anchor: model
	$(PY) benchmarks/anchor.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
