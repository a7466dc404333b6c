# hevisum: two commands do everything on a fresh machine:
#   make run    create .venv, install, run the main job on generated demo data
#   make test   create .venv if needed, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hevisum-installed
# The CPU build of torch is installed first unless the venv already has a torch (a GPU user's own build is kept).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
RUN_OUT ?= runs/demo

.PHONY: help install run test

help:
	@echo "make run      create .venv, install, run 'hevisum run' on generated demo data (-> $(RUN_OUT))"
	@echo "make test     run the test suite (creates .venv if needed)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "keeping installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
	  $(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS); \
	fi
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/hevisum run --out $(RUN_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q
