# Fresh machine: `make demo` (set up + the main job), `make test` (set up + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

# torch==2.13.0 first: a CPU wheel of it is on disk here, and pinning it up front
# stops a dependency from resolving an unpinned torch to a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/lidr run --out runs/demo

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
