# qconvert developer tasks. Works from a bare machine with Python 3 and the package registries.
#   make install    venv + the package          make dev        + dev extras + the llama.cpp oracle wheel
#   make fixtures   test artefacts (cache)      make test       dev + fixtures + pytest + ruff (every test)
#   make test-fast  the tests that need neither the llama.cpp oracle nor the real model, nor are slow
#                   (markers from tests/conftest.py; a few minutes on 2 cores)
#   make demo       convert the real fixture model and inspect the result
# Heavy artefacts go to ~/.cache/qconvert (QCONVERT_CACHE overrides), never into the repo.

VENV ?= .venv
PYTHON ?= python3
PY = $(VENV)/bin/python
PIP = $(PY) -m pip
CACHE_DIR = $(or $(QCONVERT_CACHE),$(HOME)/.cache/qconvert)
SMOLLM2 = $(CACHE_DIR)/fixtures/smollm2-135m-instruct
DEMO_OUT = out/smollm2-Q4_K_M.gguf
# pytest workers: CI has 2 cores. --dist loadfile keeps a file's tests (and its module fixtures) on one worker;
# the cache builders lock, so two workers never build the same artefact
WORKERS ?= 2
PYTEST = $(PY) -m pytest -q -n $(WORKERS) --dist loadfile

.PHONY: venv install dev oracle fixtures test test-fast demo

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: this release's CPU build lies on the machine's disk; any looser torch requirement
# pulled in by the package would fetch a multi-GB CUDA build instead.
$(VENV)/.torch-2.13.0: | $(PY)
	$(PIP) install torch==2.13.0
	touch $@

venv: $(VENV)/.torch-2.13.0

# Stamps keep repeated runs fast; editing pyproject.toml reinstalls.
$(VENV)/.installed: pyproject.toml $(VENV)/.torch-2.13.0
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch-2.13.0
	$(PIP) install -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

dev: $(VENV)/.installed-dev
	$(MAKE) oracle

# llama-cpp-python==0.3.36: wheel built once into $(CACHE_DIR)/wheels (CMAKE_BUILD_PARALLEL_LEVEL=2), then
# installed with --no-deps. Idempotent; the logic lives in tests/fixtures.py (ensure_oracle).
oracle: venv
	$(PY) tests/fixtures.py oracle

fixtures: install
	$(PY) tests/fixtures.py all

# ruff first: pytest's summary stays the last line CI reads
test: dev fixtures
	$(PY) -m ruff check qconvert tests scripts
	$(PYTEST)

# the inner loop: small synthetic fixtures are built on demand; no oracle, no SmolLM2
test-fast: dev
	$(PYTEST) -m "not oracle and not model and not slow"

demo: install
	$(PY) tests/fixtures.py model
	mkdir -p $(dir $(DEMO_OUT))
	$(VENV)/bin/qconvert convert $(SMOLLM2) --to gguf --type Q4_K_M -o $(DEMO_OUT)
	$(VENV)/bin/qconvert inspect $(DEMO_OUT)
