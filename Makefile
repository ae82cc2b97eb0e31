# The few targets the README names. Each creates .venv on first use (Python >= 3.11 as python3).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/deeplab demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/crf.py
	$(BIN)/python bench/dcnn.py
	$(BIN)/python bench/cores.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/plan.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/cluster.py
	$(BIN)/python bench/input_size.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
