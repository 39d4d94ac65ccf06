# moe-recipe. The two commands a new user needs: `make train` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast

install: $(STAMP)

# Re-runs only when requirements.txt changes; a half-finished install leaves no stamp.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The whole suite: unit tests plus the multi-rank tests (marked `multirank`).
test: install
	$(PY) -m pytest -q tests

# Unit tests only (one process each, a couple of minutes).
test-fast: install
	$(PY) -m pytest -q -m "not multirank" tests
