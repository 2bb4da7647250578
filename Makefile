# Every target sets up what it needs from nothing: a fresh machine has Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-fast lint format demo bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build on this machine's disk. A looser
	# requirement on an empty venv pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,lightning]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

format: install
	$(VENV)/bin/ruff check --fix src tests examples benchmarks
	$(VENV)/bin/ruff format src tests examples benchmarks

test: lint
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

demo: install
	$(PY) examples/demo.py

bench: install
	$(PY) benchmarks/launch.py
	$(PY) benchmarks/poll.py
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/watch_render.py
	$(PY) benchmarks/records.py

proto: install
	$(PY) -m grpc_tools.protoc -Iproto --python_out=src/loomrun/_proto \
		--pyi_out=src/loomrun/_proto proto/loomrun.proto

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
