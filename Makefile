# edgellm: `make serve` and `make test` are the two commands; both start with `make setup`.
PYTHON ?= python3
VENV   ?= .venv
EXTRAS ?= all
BIN    := $(VENV)/bin
EDGELLM := $(BIN)/edgellm

# llama-cpp-python ships only as source: we build its wheel once per (version, CMAKE_ARGS) into a wheelhouse
# outside the clone, so a second clone or `make clean` does not rebuild (pip's own cache ignores CMAKE_ARGS).
# Lean and portable by default: no tools/tests/examples/vision lib, and GGML_NATIVE=OFF (AVX2/FMA/F16C):
# -march=native enables AMX on recent Xeons, whose llama.cpp kernels crash here.
# For CUDA or Metal: make setup CMAKE_ARGS="-DGGML_CUDA=on ..." (see README).
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
export CMAKE_ARGS
WHEELHOUSE ?= $(HOME)/.cache/edgellm/wheels/$(shell printf '%s %s' '$(LLAMA_CPP_PYTHON)' '$(CMAKE_ARGS)' | sha256sum | cut -c1-16)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
# Everything runs offline: no hub look-ups from transformers / sentence-transformers.
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export HF_HUB_DISABLE_TELEMETRY = 1

.PHONY: setup install models serve test test-slow check lint typecheck clean personas

setup: install models

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade "pip>=24" "setuptools>=68" wheel
	ls $(WHEELHOUSE)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	  $(BIN)/pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python -w $(WHEELHOUSE) "$(LLAMA_CPP_PYTHON)"
	$(BIN)/pip install --find-links $(WHEELHOUSE) -e '.[$(EXTRAS)]'
	touch $@

# Idempotent: present and verified models are kept, the converter is fetched once.
#   default:  the GGUF `make serve` serves;  base: its Hugging Face form, for training and conversion tests;
#   reranker: the default cross-encoder, trained here in a few minutes from the packaged MiniLM;
#   embedder, reranker-gguf: the packaged MiniLM and that cross-encoder as GGUFs (no torch at serve time).
models: install
	$(EDGELLM) convert setup
	$(EDGELLM) models pull default base reranker gemma3-270m embedder reranker-gguf

serve: setup
	$(EDGELLM) serve --config configs/serve.yaml

# Three persona adapters on one base (about 30-45 minutes on 2 CPU cores): train, evaluate, convert to GGUF LoRA files.
personas: setup
	$(EDGELLM) train --config configs/train/personas.yaml
	$(EDGELLM) train eval runs/personas
	$(EDGELLM) convert --lora runs/personas --base-gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --out models/personas --behaviour

# torch and llama.cpp share one OpenMP runtime; more OpenMP threads than cores makes both crawl on small boxes.
# llama.cpp sets its own thread counts, so this only keeps torch (training, conversion checks, reranker) at one.
test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest

test-slow: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -m slow

lint: install
	$(BIN)/ruff check .

# mypy reads source folders, not the installed package map: a tree of links gives it the installed layout
# (edgellm/serve -> serve/, ...), so that every package is checked with the others' types resolved.
TYPECHECK_TREE := .cache/typecheck
typecheck: install
	rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)/edgellm
	for f in edgellm/*.py; do ln -s "$(CURDIR)/$$f" $(TYPECHECK_TREE)/edgellm/; done
	for s in serve train convert bench; do ln -s "$(CURDIR)/$$s" $(TYPECHECK_TREE)/edgellm/$$s; done
	cd $(TYPECHECK_TREE) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p edgellm

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
