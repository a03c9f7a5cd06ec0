# medtune — `make demo` runs the whole job on the embedded default; `make test` runs lint + tests.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
EXTRAS  ?= all
TORCH_PIP_ARGS ?=
DEMO    ?= runs/demo
export MEDTUNE_CACHE ?= $(CURDIR)/.cache/medtune
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned. This machine's pip finds the CPU wheel locally; elsewhere plain PyPI
	# serves a multi-GB CUDA build, so on a CPU-only machine run
	#   make setup TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/medtune demo --output $(DEMO) --overwrite

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q --timeout=900; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; fi; exit $$rc

bench: setup
	$(BIN)/medtune bench train --output runs/bench --overwrite
	$(BIN)/medtune bench predict --output runs/bench --overwrite --threads 1 --threads 2

clean:
	rm -rf runs .cache .pytest_cache .ruff_cache .mypy_cache
