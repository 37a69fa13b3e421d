# `make test` and `make demo` work on a fresh clone: the first run creates .venv and installs the project.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test chaos demo bench lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Two pytest workers (pytest-xdist), one per core: most tests wait on real processes and the server, so two
# at a time halve the wall time (about 6 minutes instead of 13). Each worker starts its own embedded server.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2

# `make chaos`: the randomized fault harness (tests/test_chaos.py: real queue nodes, SIGKILL/SIGSTOP/SIGTERM, worker
# kills, server failpoints, cancels; then invariants) over 50 seeds of about 20 s each. `make test` runs seeds 0-4.
# CHAOS_SEEDS is a count N (seeds 0..N-1) or a list/range: `make chaos CHAOS_SEEDS=17-17` reruns seed 17 alone.
# Reports and node logs of the last run stay under CHAOS_TMP (pytest --basetemp).
CHAOS_SEEDS ?= 50
CHAOS_TMP ?= /tmp/taskscheduler-chaos
chaos: $(STAMP)
	$(BIN)/python -m pytest tests/test_chaos.py::test_chaos --chaos-seeds $(CHAOS_SEEDS) --basetemp=$(CHAOS_TMP)

demo: $(STAMP)
	$(BIN)/taskscheduler demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy --strict src

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .taskscheduler
