# One virtual environment (.venv) for everything; each target creates it on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,dev,modelopt,dashboard,postgres
PYTEST_ARGS ?=
export YOLO_OFFLINE := 1

.PHONY: install demo test test-all lint bench train-demo clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

install: $(BIN)/.installed

# The main job on the bundled offline demo (synthetic shapes + a YOLOv10n trained on them):
# the layers, the float baseline, the search (sweep + 50 trials + the front verified on 100
# held-out images + report in runs/demo/report), and the Pareto front exported as QCDQ ONNX,
# re-measured on both splits (runs/demo/export). About 6 minutes on a quiet 2-core CPU after
# the install (docs/benchmarks.md, "Accuracy").
demo: install
	$(BIN)/search inspect
	$(BIN)/search eval
	$(BIN)/search run --budget 50
	$(BIN)/search export runs/demo --front

# The default test suite (no slow, no GPU tests).
test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python -m pytest -m slow -s $(PYTEST_ARGS)

# Rebuild the demo model from scratch (about 90 minutes on a shared 2-core CPU).
train-demo: install
	$(BIN)/python -m search.demo.train

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
