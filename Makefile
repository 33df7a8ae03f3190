# Two entry points, both named in README.md:
#   make demo   prune, fine-tune, save and reload a small LeNet (reuses .venv once made)
#   make test   what CI runs: a NEW virtual environment, then lint, types and the whole test suite
# Only python3 (3.10 or newer) and make are assumed; everything else comes from the package index.

PYTHON ?= python3
VENV := .venv
TEST_VENV := .venv-test

.PHONY: help demo test check lint typecheck pytest timm-zoo docs clean

help:
	@echo "make demo   install masksparse into $(VENV) and run its demo"
	@echo "make test   build a fresh $(TEST_VENV), then ruff, mypy and pytest (what CI runs)"
	@echo "make docs   build the documentation site into docs/_build/html (needs $(TEST_VENV))"
	@echo "make timm-zoo  every timm family of tests/test_timm_zoo.py (about an hour; needs $(TEST_VENV))"
	@echo "make clean  remove both virtual environments and build outputs"

demo:
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e ".[examples,safetensors]"
	$(VENV)/bin/python -m masksparse demo

# A new environment every time: a package left over from an earlier install must never make the suite pass.
# --no-compile: byte-compiling all of torch at install costs more than compiling what the tests import.
test:
	rm -rf $(TEST_VENV)
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/python -m pip install --quiet --no-compile -e ".[test]"
	$(MAKE) --no-print-directory --keep-going check

# --keep-going runs all three even when one fails (so one run shows every problem), and still fails.
check: lint typecheck pytest

lint:
	$(TEST_VENV)/bin/ruff check .
	$(TEST_VENV)/bin/ruff format --check .

typecheck:
	$(TEST_VENV)/bin/mypy masksparse

# Doctests, README snippets, notebooks and the strict docs build are all part of the suite. The whole
# timm zoo (98 families, about an hour) runs with `make timm-zoo`; a fast sample of it runs here.
pytest:
	$(TEST_VENV)/bin/python -m pytest -m "not timm_zoo"

timm-zoo:
	$(TEST_VENV)/bin/python -m pytest -m timm_zoo tests/test_timm_zoo.py

docs:
	$(TEST_VENV)/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) $(TEST_VENV) build dist docs/_build
