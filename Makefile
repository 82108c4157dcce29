# The two commands in the README: `make demo` (the whole product on synthetic data) and
# `make test` (the suite, against real PostgreSQL and Redis, and a headless Chromium for the
# review page, Orthanc and dcmtk for the DICOM network). Both set themselves up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PG_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

.PHONY: demo test compose-test services browser pacs lint clean

$(BIN)/cxr: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "cxr-triage needs Python 3.11+ (found: $$($(PYTHON) --version))"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/cxr

demo: $(BIN)/cxr
	$(BIN)/cxr demo

services:
	@sh .ci/services.sh

browser:
	@sh .ci/browser.sh

pacs:
	@sh .ci/pacs.sh

test: $(BIN)/cxr services browser pacs
	CXR_TEST_POSTGRES_URL="$(PG_URL)" $(BIN)/pytest -ra --durations=30

# docker-compose.yml for real (also part of `make test` when a Docker engine answers).
compose-test: $(BIN)/cxr
	$(BIN)/pytest -ra tests/test_compose.py tests/test_compose_live.py

lint: $(BIN)/cxr
	$(BIN)/ruff check .

clean:
	rm -rf var .pytest_cache .ruff_cache
