# make install   create .venv, install requirements.txt and this repository's packages (pip install -e .)
# make serve     start tritonserver on model_repository/ (HTTP 8000, gRPC 8001, metrics 8002)
# make test      run the whole test suite (unit, kernel and end-to-end)
# make test-e2e  only the end-to-end tests (a real tritonserver)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
SERVE_ARGS ?=

.PHONY: install serve test test-e2e clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q -e .
	touch $(STAMP)

serve: install
	$(PY) tools/serve.py $(SERVE_ARGS)

test: install
	$(PY) -m pytest -q --timeout=900 tests $(PYTEST_ARGS)

test-e2e: install
	$(PY) -m pytest -q --timeout=900 tests/e2e $(PYTEST_ARGS)

clean:
	rm -rf .triton .pytest_cache .hypothesis *.egg-info build
