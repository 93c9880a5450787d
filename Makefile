# reconcile: the two commands a new user types are `make demo` and `make test`.
# Works from any directory: `make -C path/to/reconcile demo`.
ROOT := $(dir $(abspath $(lastword $(MAKEFILE_LIST))))
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := $(ROOT).venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test format ui screenshot report bench clean

# The install is reproducible: constraints.txt pins every package of the tested set.
$(STAMP): $(ROOT)pyproject.toml $(ROOT)constraints.txt
	@test -n "$(PYTHON)" || { echo "No python3 found: install Python 3.11 and run make again."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(ROOT)constraints.txt -e "$(ROOT)[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/reconcile demo

test: $(STAMP)
	cd $(ROOT) && $(BIN)/ruff check . && $(BIN)/ruff format --check .
	cd $(ROOT) && $(BIN)/pytest -n 2

ui: $(STAMP)
	@test -f $(ROOT).reconcile/simulator_truth.sqlite || $(BIN)/reconcile demo
	$(BIN)/reconcile ui

bench: $(STAMP)
	cd $(ROOT) && $(BIN)/python bench/run.py

report: $(STAMP)
	$(BIN)/reconcile report

screenshot: $(STAMP)
	$(BIN)/python -m pip install --quiet -c $(ROOT)constraints.txt -e "$(ROOT)[docs]"
	$(BIN)/python $(ROOT)scripts/screenshot.py

format: $(STAMP)
	cd $(ROOT) && $(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(ROOT).reconcile
