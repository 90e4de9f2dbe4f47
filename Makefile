# cxr-triage developer and CI entry points (the README's Quick start uses `make serve` and `make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := dcmtk dicom3tools postgresql chromium chromium-driver orthanc orthanc-dicomweb
PACKAGES := dicom_node triage_core training
STORAGE ?= ./triage-storage

.PHONY: help system-deps venv install lint typecheck imports test test-all bench serve clean

help:
	@echo "make serve   install the serving stack (no torch) and start the DICOM node on embedded defaults"
	@echo "make test    install (Debian packages too) and run lint, types, import contracts, tests"
	@echo "make bench   run every benchmark (--quick) and print their ratios"

# Debian packages the tests use: DCMTK (independent DICOM peer), dicom3tools (dciodvfy),
# the PostgreSQL server binaries (throwaway test clusters), Chromium and its driver (the
# headless browser test of the web pages), Orthanc with its DICOMweb plugin (the DICOMweb peer
# test, a throwaway loopback server). Skipped when already present.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python

# The editable install is redone only when pyproject.toml changed (code changes need none):
# the stamp file records the last install.
STAMP := $(VENV)/.cxr-triage-installed

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# `make serve` installs the serving stack only (`pip install -e .`: ONNX Runtime, no torch);
# `make test` (the stamp above) installs `.[dev]`, which includes the training stack.
SERVE_STAMP := $(VENV)/.cxr-triage-serve-installed

$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

lint: install
	$(BIN)/ruff check $(PACKAGES) tests benchmarks
	$(BIN)/ruff format --check $(PACKAGES) tests benchmarks

typecheck: install
	$(BIN)/mypy

imports: install
	$(BIN)/lint-imports

test: system-deps install lint typecheck imports
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" -q

test-all: system-deps install lint typecheck imports
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install
	@benchmarks/run_all.sh $(BIN)/python

serve: $(SERVE_STAMP)
	$(BIN)/triage -v serve --storage $(STORAGE)

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
