# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv if needed and install the package with what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ML_STAMP := $(VENV)/.installed-ml-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# PyTorch's CPU build (this machine has no GPU; a plain `torch` from PyPI is a multi-GB CUDA build)
TORCH ?= torch==2.13.0

.PHONY: demo test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-[0-9]* && touch $(STAMP)

# the tests also run the real backends (transformers, diffusers, openai) on tiny local models
$(ML_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[test,llm,diffusion,openai]'
	rm -f $(VENV)/.installed-ml-* && touch $(ML_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/arbiter demo

test: $(ML_STAMP)
	ARBITER_REQUIRE_EXTRAS=1 $(BIN)/python -m pytest -q --numprocesses=auto --maxprocesses=4 --dist loadfile --reruns 1 -rR

clean:
	rm -rf $(VENV) .pytest_cache
