# Every target sets up what it needs from nothing: a fresh machine has Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install system test test-fast stress lint format demo bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build on this machine's disk. A looser
	# requirement on an empty venv pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,lightning,hf]'
	touch $(STAMP)
	# An editable install leaves loomrun's own modules uncompiled, and with
	# PYTHONDONTWRITEBYTECODE set (as here) every process compiled them again: 40 ms of
	# each launch and each command. Byte-compiled as a regular install would be:
	$(PY) -m compileall -q src

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

format: install
	$(VENV)/bin/ruff check --fix src tests examples benchmarks
	$(VENV)/bin/ruff format src tests examples benchmarks

# What the tests drive besides Python: tmux (the terminal view), Debian's chromium with
# its driver (the web page) and openssl (a TLS broker's certificates). Installed with
# apt-get when missing and make runs as root; elsewhere the tests that need them are
# skipped, each saying why.
system:
	@missing=""; \
	command -v tmux >/dev/null || missing="$$missing tmux"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing$$missing with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	elif [ -n "$$missing" ]; then echo "not installed:$$missing (their tests will be skipped)"; fi

test: lint system
	$(PY) -m pytest

# In process only (params, the mailbox, the protocol rig, the optimizer hooks, usage errors
# through CliRunner): about a minute. `make test` runs it and tests/e2e, which start real
# supervisors, workers and brokers.
test-fast: install
	$(PY) -m pytest tests/unit

# Races by the dozen (tests/stress): supervisors started at one moment, killed at random
# moments of start-up; nothing may be left after any trial. Longer than `make test`, and
# not part of it; writes its figures to STRESS.md. LOOMRUN_STRESS_SCALE=0.1 for a quick look.
stress: install
	$(PY) -m pytest tests/stress -q

demo: install
	$(PY) examples/demo.py

bench: install system
	$(PY) -m compileall -q src
	$(PY) benchmarks/report.py

proto: install
	$(PY) -m grpc_tools.protoc -Iproto --python_out=src/loomrun/_proto \
		--pyi_out=src/loomrun/_proto proto/loomrun.proto

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
