# edgellm: `make serve` and `make test` are the two commands; both start with `make setup`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EDGELLM := $(BIN)/edgellm

# llama-cpp-python builds from source: keep the build lean (no tools, tests, examples or the vision lib).
# For CUDA or Metal, add -DGGML_CUDA=on / -DGGML_METAL=on (see README).
CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
export CMAKE_ARGS
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
# Everything runs offline: no hub look-ups from transformers / sentence-transformers.
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export HF_HUB_DISABLE_TELEMETRY = 1

.PHONY: setup install models serve test test-slow check lint typecheck clean

setup: install models

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade "pip>=24" "setuptools>=68" wheel
	$(BIN)/pip install -e '.[all]'
	touch $@

# Idempotent: present and verified models are kept.
models: install
	$(EDGELLM) models pull default

serve: setup
	$(EDGELLM) serve --config configs/serve.yaml

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy serve edgellm

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
