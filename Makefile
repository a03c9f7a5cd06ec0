# medtune — `make demo` runs the whole job on the embedded default; `make test` runs lint + tests.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
EXTRAS  ?= all
DEMO    ?= runs/demo
export MEDTUNE_CACHE ?= $(CURDIR)/.cache/medtune
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel (never a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/medtune demo --output $(DEMO)

lint: setup
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q --timeout=900

bench: setup
	$(BIN)/medtune bench train --output runs/bench --overwrite
	$(BIN)/medtune bench predict --output runs/bench --overwrite --threads 1 --threads 2

clean:
	rm -rf runs .cache .pytest_cache .ruff_cache
